#include "detail/lapack.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "detail/blas.hpp"
#include "detail/gram.hpp"
#include "detail/parallel.hpp"
#include "detail/require.hpp"
#include "levattn/error.hpp"

namespace levattn::detail {

std::vector<double> symmetric_eigen(std::vector<double>& a, index_t r, const char* who) {
  std::vector<double> w(static_cast<std::size_t>(r));
  const SerialScope serial;
  const lapack_int info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'U', li(r), a.data(), li(r), w.data());
  if (info != 0) fail(ErrorKind::internal, who, "LAPACKE_dsyevd failed with info ", info);
  return w;
}

namespace {

// Up to this order the Cholesky factor and its inverse are computed by plain loops: the LAPACK
// calls' set-up costs more than their 2 r^3 / 3 flops (a leverage selection over 197 keys of 16
// dimensions spent a tenth of its time in dpotrf and dtrtri).
constexpr index_t kSmallCholesky = 32;

// L L^T = a (row-major lower triangle, row by row), then L^-1 in place column by column (each
// entry reads L's entries to its right, not yet overwritten, and L^-1's above it).
bool small_inverse_cholesky(double* a, index_t r) {
  for (index_t i = 0; i < r; ++i) {
    double* row = a + i * r;
    for (index_t j = 0; j < i; ++j) {
      const double* above = a + j * r;
      double s = row[j];
      for (index_t p = 0; p < j; ++p) s -= row[p] * above[p];
      row[j] = s / above[j];
    }
    double s = row[i];
    for (index_t p = 0; p < i; ++p) s -= row[p] * row[p];
    if (!(s > 0.0)) return false;  // not positive definite (or not finite), as dpotrf's info > 0
    row[i] = std::sqrt(s);
  }
  for (index_t j = 0; j < r; ++j) {
    a[j * r + j] = 1.0 / a[j * r + j];
    for (index_t i = j + 1; i < r; ++i) {
      double s = a[i * r + j] * a[j * r + j];
      for (index_t p = j + 1; p < i; ++p) s += a[i * r + p] * a[p * r + j];
      a[i * r + j] = -s / a[i * r + i];
    }
  }
  return true;
}

}  // namespace

bool inverse_cholesky(std::vector<double>& a, index_t r) {
  if (r <= kSmallCholesky) return small_inverse_cholesky(a.data(), r);
  // The row-major lower triangle is the column-major upper one: LAPACK works on the buffer as it
  // is (no transposed copies, no NaN scan: the callers' matrices are finite), U^T U = a in
  // column-major order being L L^T = a in row-major order, and U^-1 stored there being L^-1.
  const SerialScope serial;
  lapack_int info = LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, 'U', li(r), a.data(), li(r));
  if (info == 0) info = LAPACKE_dtrtri_work(LAPACK_COL_MAJOR, 'U', 'N', li(r), a.data(), li(r));
  return info == 0;
}

std::vector<double> householder_r(std::vector<double>& a, index_t rows, index_t d) {
  std::vector<double> R(static_cast<std::size_t>(d * d), 0.0);
  if (rows == 0) return R;
  std::vector<double> tau(static_cast<std::size_t>(std::min(rows, d)));
  {
    const SerialScope serial;
    const lapack_int info = LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, li(rows), li(d), a.data(), li(d), tau.data());
    LEVATTN_ASSERT(info == 0, "LAPACKE_dgeqrf failed with info ", info);
  }
  for (index_t i = 0; i < std::min(rows, d); ++i)
    for (index_t j = i; j < d; ++j) R[i * d + j] = a[i * d + j];
  return R;
}

std::vector<double> key_r_factor(ConstMatrix K) {
  constexpr index_t kRows = 1024;
  const index_t n = K.rows, d = K.cols;
  const index_t blocks = (n + kRows - 1) / kRows;
  const index_t partials = gram_partials(blocks, d);
  std::vector<std::vector<double>> part(static_cast<std::size_t>(partials));
  // Partial p folds blocks p, p + P, ...: QR of [R_p; block] replaces R_p.
  parallel_tasks(
      partials, 4.0 * static_cast<double>(n) * static_cast<double>(d * d), [] { return std::vector<double>(); },
      [&](index_t p, std::vector<double>& stack) {
        std::vector<double> R;
        for (index_t b = p; b < blocks; b += partials) {
          const index_t r0 = b * kRows, rows = std::min(kRows, n - r0), top = R.empty() ? 0 : d;
          stack.resize(static_cast<std::size_t>((top + rows) * d));
          std::copy(R.begin(), R.end(), stack.begin());
          for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < d; ++j) stack[(top + i) * d + j] = K(r0 + i, j);
          R = householder_r(stack, top + rows, d);
        }
        part[p] = std::move(R);
      });
  std::vector<double> stack(static_cast<std::size_t>(partials * d * d));
  for (index_t p = 0; p < partials; ++p) std::copy(part[p].begin(), part[p].end(), stack.begin() + p * d * d);
  return householder_r(stack, partials * d, d);
}

}  // namespace levattn::detail
