// levattn/metrics.hpp: the brute-force heavy-entry oracle and the agreement of two lists of heavy
// entries. O(m n d) time, O(block n) memory: for evaluation, not for production paths. (How a
// selection fits attention is evaluate.hpp's.)
#pragma once
#include "levattn/heavy_entries.hpp"

namespace levattn {

/// Every (i, j, A_ij) with A_ij >= eps for A = row-normalised (Q K^T)^2 by scanning all keys of
/// every query (float64 arithmetic): the oracle heavy_entries() is compared with. Queries whose
/// normaliser is exactly zero go to zero_rows.
HeavyEntries heavy_entries_brute_force(ConstMatrix Q, ConstMatrix K, double eps);

/// How a list of heavy entries agrees with the true list.
struct HeavyAgreement {
  index_t common = 0;               ///< (query, key) pairs in both
  double recall = 1.0;              ///< common / |truth| (1 when truth is empty)
  double precision = 1.0;           ///< common / |found| (1 when found is empty)
  double max_rel_value_error = 0.0; ///< max |found - truth| / truth over the common pairs
};

/// Compares `found` with `truth` (both sorted by query, then key, as heavy_entries and
/// heavy_entries_brute_force return them) by one merge: O(|found| + |truth|).
HeavyAgreement compare_heavy_entries(const HeavyEntries& found, const HeavyEntries& truth);

}  // namespace levattn
