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
  std::vector<double> scores;    ///< score of each selected key (only the selected keys')
  /// An a-priori bound on |indices|: floor(min(n, S (1 + gamma)^2 / eps)) for U_eps, with S the
  /// scores' sum_bound and gamma their rel_error_bound; min(n, k) for a top-k set. A double: it
  /// can exceed every integer type for tiny eps.
  double size_bound = 0.0;
  /// How the scores were computed (copied from LeverageScores): their accuracy gamma, method,
  /// and for sketches the sketch's rows and failure probability.
  double score_rel_error_bound = 0.0;
  ScoreMethod method = ScoreMethod::exact;
  index_t sketch_size = 0;
  double failure_probability = 0.0;
  /// Top-k only: keys whose score equals the k-th largest but that did not fit, so that the
  /// choice among the tied keys was made by index (lower first). 0 when the set is determined by
  /// the scores alone; for K of full row rank every score is 1 and all n - k such keys tie.
  index_t ties_left_out = 0;
};

/// U_eps = { j : tau_j >= eps }: contains the key of every eps-heavy entry of x^2 attention
/// (row-normalised (Q K^T)^2) for every possible query matrix Q at once, since A_ij <= tau_j.
/// |U_eps| <= rank / eps <= d / eps. To stay a guaranteed superset under rounding the threshold
/// is lowered to eps / (1 + scores.rel_error_bound), so |U| <= rank (1 + gamma) / eps.
/// eps must lie in (0, 1]. O(n).
UniversalSet universal_set(const LeverageScores& scores, double eps);

/// The k keys of largest score (ties to the lower index, counted in ties_left_out), returned
/// ascending. k >= 1; k >= n selects every key. Carries no heavy-entry guarantee beyond what
/// eps = k-th score gives. O(n).
UniversalSet universal_set_top_k(const LeverageScores& scores, index_t k);

/// Convenience: leverage_scores(K, options) followed by universal_set(scores, eps).
UniversalSet universal_set(ConstMatrix K, double eps, const LeverageOptions& options = {});

/// Which set universal_sets() selects for each key matrix.
struct UniversalOptions {
  double eps = 0.0;   ///< U_eps (eps in (0, 1]) ...
  index_t top_k = 0;  ///< ... or the top_k keys (>= 1): exactly one of the two
  /// Scores: leverage scores for p = 2 (exact or sketched, by `leverage`), else the |x|^p
  /// sensitivity bounds of lewis_weights.hpp (exact method only).
  double p = 2.0;
  LeverageOptions leverage;
};

/// For every (batch, head) pair of K (batch, heads, n, d), in b * heads + h order, the set
/// universal_set(sensitivity_bounds(K_bh, p, leverage), eps) or its top-k counterpart. Pairs run
/// in parallel, each on one thread. O(batch heads n d^2). Throws Error(invalid_argument) unless
/// exactly one of eps in (0, 1] and top_k >= 1 is given, and as sensitivity_bounds.
std::vector<UniversalSet> universal_sets(const Tensor4Ref& K, const UniversalOptions& options);

}  // namespace levattn
