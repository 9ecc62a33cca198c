// detail/gram.hpp: fixed-order reduction of partial Gram matrices, so that a Gram accumulated by
// several threads has the same bits for any thread count.
#pragma once
#include <vector>

#include "levattn/matrix.hpp"

namespace levattn::detail {

/// sum_p part[p] for `partials` upper-triangular d x d blocks stored one after another, added in
/// index order, returned as a full symmetric d x d row-major matrix.
inline std::vector<double> sum_partial_grams(const double* part, index_t partials, index_t d) {
  std::vector<double> out(static_cast<std::size_t>(d * d), 0.0);
  for (index_t p = 0; p < partials; ++p)
    for (index_t i = 0; i < d; ++i)
      for (index_t j = i; j < d; ++j) out[i * d + j] += part[(p * d + i) * d + j];
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < i; ++j) out[i * d + j] = out[j * d + i];
  return out;
}

/// Copies the upper triangle of the d x d matrix a into its lower triangle.
inline void symmetrize_upper(std::vector<double>& a, index_t d) {
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < i; ++j) a[i * d + j] = a[j * d + i];
}

}  // namespace levattn::detail
