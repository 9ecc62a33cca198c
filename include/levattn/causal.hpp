// levattn/causal.hpp: causal (autoregressive) x^2 universal sets and heavy entries (math.md
// 1.6, docs/design.md "Causal attention"): query i sees keys 0 .. i only.
#pragma once
#include <vector>

#include "levattn/heavy_entries.hpp"
#include "levattn/leverage_scores.hpp"
#include "levattn/matrix.hpp"
#include "levattn/selection.hpp"

namespace levattn {

/// Queries per block of the causal sets: the candidates are refreshed once per block.
inline constexpr index_t kCausalBlock = 256;

/// The causal universal sets of K (n x d) at threshold eps in (0, 1], as the Selection of one
/// (batch, head) pair with m = n queries, causal, segment = block: shared_keys[r] (ascending) holds
/// for the queries r block .. (r + 1) block - 1 the keys j < r block whose prefix leverage score
/// against M = sum_{l < r block} k_l k_l^T is >= eps (less the proven rounding and a 1e-4
/// margin), then every key of the block itself.
///
/// Guarantee (x^2): for every query i >= j, A_ij = (q_i.k_j)^2 / sum_{l <= i} (q_i.k_l)^2 >= eps
/// implies that key j is in the set of i's block. Because k_j^T M_i^+ k_j >= A_ij and prefix
/// scores only fall as keys arrive, a key below eps at the block's start stays below for every
/// query of the block and after; the block's own keys are all kept. So every set is a superset
/// of the prefix universal set of each of its queries, by at most `block` keys.
/// Scores treat directions of M below rank_rtol (times 0.1 sqrt(eps) when pruning) of its
/// largest singular value as null, as leverage_scores does: for keys that ill-conditioned the
/// guarantee holds for K projected onto its numerical range.
/// Built with StreamingUniversalSet (pushed a block at a time, pruned at every block start):
/// O(n d^2 + (n / block)(d^3 + |C| d^2)) time, |C| <= about d / eps; memory O(d^2 + |C| d) plus
/// the sets themselves (sum of their sizes). Deterministic for any thread count.
/// Throws Error(invalid_argument) on an empty or non-finite K, eps outside (0, 1], block < 1, a
/// ridge (ridge scores are below the x^2 sensitivities) or a sketch.
Selection causal_universal_sets(ConstMatrix K, double eps, index_t block = kCausalBlock,
                                const LeverageOptions& options = {});

/// Every eps-heavy entry of causal x^2 attention: all (i, j, A_ij) with j <= i and
/// A_ij = (q_i.k_j)^2 / Z_i >= eps, Z_i = sum_{l <= i} (q_i.k_l)^2, for Q and K of n rows each.
///
/// Exact: only the keys of i's causal set are examined (which hold every heavy key), and Z_i is
/// q_i^T M q_i for the Gram M of the keys before i's block (float64) plus the block's own terms
/// up to i. Queries with Z_i = 0 (to the rounding of q^T M q: 4 d u trace(M_i) |q_i|^2) are
/// listed in zero_rows. universal_size is the largest block set examined; rank is not computed
/// (0). O(n d^2 + n |C| d) time (float64 products by blocks). Throws
/// Error(invalid_argument) on shapes (Q and K need n rows and d columns each), non-finite or
/// empty input, eps outside (0, 1], or a ridge in options (ridge scores are below the x^2
/// sensitivities, so their sets can miss heavy entries).
HeavyEntries causal_heavy_entries(ConstMatrix Q, ConstMatrix K, double eps, const LeverageOptions& options = {});

/// causal_heavy_entries for every (batch, head) pair of Q and K (batch, heads, n, d), in
/// b * heads + h order, pairs in parallel. Throws as the single-pair version, and
/// Error(invalid_argument) if (batch, heads) differ.
std::vector<HeavyEntries> causal_heavy_entries(const Tensor4Ref& Q, const Tensor4Ref& K, double eps,
                                               const LeverageOptions& options = {});

}  // namespace levattn
