#include <cmath>
#include <sstream>

#include "detail/validate.hpp"

namespace levattn::detail {

void require_finite_matrix(ConstMatrix A, const char* what) {
  if (A.rows <= 0 || A.cols <= 0) {
    std::ostringstream os;
    os << what << ": expected a non-empty matrix, got shape (" << A.rows << ", " << A.cols << ")";
    invalid(os.str());
  }
  bool all = true;
#pragma omp parallel for schedule(static) reduction(&& : all) if (A.rows * A.cols > (1 << 16))
  for (index_t i = 0; i < A.rows; ++i) all = all && all_finite(A.row(i), A.cols);
  if (all) return;
  for (index_t i = 0; i < A.rows; ++i) {
    const float* r = A.row(i);
    {
      for (index_t j = 0; j < A.cols; ++j)
        if (!std::isfinite(r[j])) {
          std::ostringstream os;
          os << what << ": expected finite values, found " << r[j] << " at row " << i
             << ", column " << j;
          invalid(os.str());
        }
    }
  }
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
