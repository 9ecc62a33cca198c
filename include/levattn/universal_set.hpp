// levattn/universal_set.hpp: universal sets of keys (docs/design.md).
#pragma once
#include <vector>

#include "levattn/leverage_scores.hpp"

namespace levattn {

/// A set of key indices, ascending, with their scores.
struct UniversalSet {
  index_t n = 0;                 ///< number of keys the set was selected from
  index_t rank = 0;              ///< numerical rank of K
  std::vector<index_t> indices;  ///< ascending, 0-based
  std::vector<double> scores;    ///< leverage score of each selected key
};

/// U_eps = { j : tau_j >= eps }: contains the key of every eps-heavy entry of x^2 attention
/// (row-normalised (Q K^T)^2) for every possible query matrix Q at once, since A_ij <= tau_j.
/// |U_eps| <= rank / eps <= d / eps. To stay a guaranteed superset under rounding the threshold
/// is lowered to eps / (1 + scores.rel_error_bound), so |U| <= rank (1 + gamma) / eps.
/// eps must lie in (0, 1]. O(n).
UniversalSet universal_set(const LeverageScores& scores, double eps);

/// The k keys of largest score (ties to the lower index), returned ascending. k >= 1; k >= n
/// selects every key. Carries no heavy-entry guarantee beyond what eps = k-th score gives. O(n).
UniversalSet universal_set_top_k(const LeverageScores& scores, index_t k);

/// Convenience: leverage_scores(K, options) followed by universal_set(scores, eps).
UniversalSet universal_set(ConstMatrix K, double eps, const LeverageOptions& options = {});

}  // namespace levattn
