#include <bit>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <algorithm>

#include "detail/validate.hpp"

namespace levattn::detail {

namespace {

// Over x[0 .. n): whether any entry is NaN or Inf, and max |x_j|, in 16 independent lanes so
// that the loop vectorises.
struct Scan {
  bool bad = false;
  float max_abs = 0.0f;
};

Scan scan(const float* x, index_t n) {
  std::uint32_t bad[16] = {};
  float m[16] = {};
  index_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (index_t l = 0; l < 16; ++l) {
      const std::uint32_t bits = std::bit_cast<std::uint32_t>(x[j + l]);
      bad[l] |= static_cast<std::uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
      const float a = std::bit_cast<float>(bits & 0x7fffffffu);
      m[l] = a > m[l] ? a : m[l];
    }
  Scan out;
  for (; j < n; ++j) {
    out.bad = out.bad || !is_finite(x[j]);
    out.max_abs = std::max(out.max_abs, std::fabs(x[j]));
  }
  for (index_t l = 0; l < 16; ++l) {
    out.bad = out.bad || bad[l] != 0;
    out.max_abs = std::max(out.max_abs, m[l]);
  }
  return out;
}

// scan() over the whole matrix: contiguous rows as runs of up to 2^14 entries, else row by row.
Scan scan_matrix(ConstMatrix A) {
  const bool flat = A.ld == A.cols;
  const index_t total = A.rows * A.cols, chunk = index_t{1} << 14;
  const index_t tasks = flat ? (total + chunk - 1) / chunk : A.rows;
  bool bad = false;
  float best = 0.0f;
#pragma omp parallel for schedule(static) reduction(|| : bad) reduction(max : best) if (total > (1 << 16))
  for (index_t t = 0; t < tasks; ++t) {
    const Scan sc = flat ? scan(A.data + t * chunk, std::min(chunk, total - t * chunk)) : scan(A.row(t), A.cols);
    bad = bad || sc.bad;
    best = sc.max_abs > best ? sc.max_abs : best;
  }
  return {bad, best};
}

// Names the first non-finite entry (row-major order).
[[noreturn]] void non_finite(ConstMatrix A, const char* what) {
  for (index_t i = 0; i < A.rows; ++i)
    for (index_t j = 0; j < A.cols; ++j)
      if (!std::isfinite(A(i, j))) {
        std::ostringstream os;
        os << what << ": expected finite values, found " << A(i, j) << " at row " << i << ", column " << j;
        invalid(os.str());
      }
  throw Error(ErrorKind::internal, std::string(what) + ": non-finite entry not found again");
}

void require_non_empty(ConstMatrix A, const char* what) {
  if (A.rows <= 0 || A.cols <= 0) {
    std::ostringstream os;
    os << what << ": expected a non-empty matrix, got shape (" << A.rows << ", " << A.cols << ")";
    invalid(os.str());
  }
}

}  // namespace

void require_finite_matrix(ConstMatrix A, const char* what) {
  require_non_empty(A, what);
  if (scan_matrix(A).bad) non_finite(A, what);
}

double finite_max_abs(ConstMatrix A, const char* what) {
  require_non_empty(A, what);
  const Scan sc = scan_matrix(A);
  if (sc.bad) non_finite(A, what);
  return static_cast<double>(sc.max_abs);
}

void require_open_unit(double v, const char* what) {
  if (!(v > 0.0 && v < 1.0)) {
    std::ostringstream os;
    os << what << ": expected a number in (0, 1), got " << v;
    invalid(os.str());
  }
}

void require_eps(double eps, const char* what) {
  if (!(eps > 0.0 && eps <= 1.0)) {
    std::ostringstream os;
    os << what << ": expected a number in (0, 1], got " << eps;
    invalid(os.str());
  }
}

}  // namespace levattn::detail
