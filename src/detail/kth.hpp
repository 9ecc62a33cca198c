// detail/kth.hpp: the k-th largest of a float array by vectorised counting passes (the
// selections' thresholds: exact top-k, cluster search, universal sets by rank).
#pragma once
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "kernels/elementwise.hpp"

namespace levattn::detail {

/// The k-th largest of v[0 .. count) (finite or -inf, at least k finite), with how many entries
/// are larger and how many equal. best is the largest entry. For many entries, vectorised counts
/// bracket it first: from best down, a window [lo, hi) that doubles until at least k values are
/// >= lo, then halves while it holds more than 8; those few are selected exactly (scratch).
struct Kth {
  float value;
  std::size_t above, equal;
};

inline Kth kth_largest(const kernels::RowOps& ops, const float* v, index_t count, index_t k, float best,
                       std::vector<float>& scratch) {
  // A counting pass over a few hundred entries costs a few vector instructions, a selection's
  // mispredicted branches several nanoseconds per entry: the window narrows to a handful first.
  constexpr index_t kFew = 8, kDirect = 16;
  const auto exact = [&](index_t rank, index_t above) {  // over the entries in scratch
    std::nth_element(scratch.begin(), scratch.begin() + rank, scratch.end(), std::greater<float>());
    const float x = scratch[static_cast<std::size_t>(rank)];
    const auto larger = std::count_if(scratch.begin(), scratch.begin() + rank, [x](float y) { return y > x; });
    return Kth{x, static_cast<std::size_t>(above + larger), static_cast<std::size_t>(std::count(scratch.begin(), scratch.end(), x))};
  };
  if (count <= kDirect) {
    scratch.assign(v, v + count);
    return exact(k - 1, 0);
  }
  const float lowest = std::numeric_limits<float>::lowest();
  float hi = std::nextafter(best, std::numeric_limits<float>::infinity()), lo = best;
  index_t at_hi = 0, at_lo = ops.count_at_least(v, count, lo);
  for (float span = std::max(1.0f, std::fabs(best)) / 16; at_lo < k; span *= 2) {
    hi = lo, at_hi = at_lo;
    lo = best - span < lowest || span > std::numeric_limits<float>::max() / 4 ? lowest : best - span;
    at_lo = ops.count_at_least(v, count, lo);
  }
  while (at_lo - at_hi > kFew) {
    const float mid = 0.5f * lo + 0.5f * hi;
    if (mid <= lo || mid >= hi) break;  // adjacent floats: the rest are ties
    const index_t at_mid = ops.count_at_least(v, count, mid);
    (at_mid >= k ? lo : hi) = mid;
    (at_mid >= k ? at_lo : at_hi) = at_mid;
  }
  scratch.resize(static_cast<std::size_t>(count));
  scratch.resize(static_cast<std::size_t>(ops.collect_between(v, count, lo, hi, scratch.data())));
  return exact(k - 1 - at_hi, at_hi);
}

}  // namespace levattn::detail
