#include "detail/lapack.hpp"

#include <algorithm>
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

bool inverse_cholesky(std::vector<double>& a, index_t r) {
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
