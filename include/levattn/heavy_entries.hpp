// levattn/heavy_entries.hpp: every eps-heavy entry of x^2 attention, exactly (math.md 1.2).
#pragma once
#include <vector>

#include "levattn/leverage_scores.hpp"

namespace levattn {

struct HeavyEntry {
  index_t query = 0;
  index_t key = 0;
  double value = 0.0;  ///< A_ij = (q_i.k_j)^2 / sum_l (q_i.k_l)^2
};

struct HeavyEntries {
  std::vector<HeavyEntry> entries;       ///< sorted by query, then key
  std::vector<index_t> zero_rows;        ///< queries whose row normaliser is zero (ascending)
  index_t universal_size = 0;            ///< |U_eps| searched
  index_t rank = 0;                      ///< numerical rank of K
};

/// All (i, j, A_ij) with A_ij >= eps for A = D^-1 (Q K^T)^2 (entrywise square, rows summing to 1).
///
/// Exact, not approximate: the row normaliser is Z_i = q_i^T M q_i with M = K^T K (float64),
/// and only keys of the universal set U_eps are examined, which contains every heavy key.
/// A query with Z_i = 0 (to rounding: Z_i <= 64 u ||q_i||^2 lambda_max(M), i.e. q_i orthogonal to
/// every key) has no defined row: it is listed in zero_rows and yields no entries.
/// Q: m x d, K: n x d, both finite and non-empty, equal d. eps in (0, 1].
/// Complexity: O(n d^2 + m d^2 + m |U| d) time with |U| <= d / eps; never touches all n keys per
/// query. Workspace O(d^2 + |U| d + block * |U|).
/// Keys of K whose condition number exceeds 1 / LeverageOptions::rank_rtol (1e5) lie partly in
/// directions treated as null; for such K the guarantee holds for K projected onto its numerical
/// range.
HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps);

}  // namespace levattn
