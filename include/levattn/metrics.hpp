// levattn/metrics.hpp: the evaluation metrics of docs/design.md, computed against the dense
// reference, and a brute-force heavy-entry oracle. O(m n d) time, O(block n) memory: for
// evaluation, not for production paths.
#pragma once
#include "levattn/attention.hpp"
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

struct SelectionMetrics {
  index_t heavy_total = 0;     ///< eps-heavy entries of the full attention matrix
  index_t heavy_selected = 0;  ///< of those, entries whose key each query's selection holds
  double heavy_recall = 1.0;   ///< heavy_selected / heavy_total (1 when there are none)
  double mass_captured = 0.0;  ///< mean over queries of sum_{j in S_i} A_ij
  double output_error = 0.0;   ///< ||O_approx - O_full||_F / ||O_full||_F
};

/// Compares one head's attention over a selection with full attention of the same kernel.
/// `options` gives kernel, scale, p and window; `selection` is the AttentionResult of the
/// approximate run made with return_selection (shared_keys[0] or query_keys); approx is its output
/// (m x dv). A_ij are the entries of full attention under options' kernel.
SelectionMetrics selection_metrics(ConstMatrix Q, ConstMatrix K, ConstMatrix V,
                                   const float* approx, const AttentionOptions& options,
                                   const AttentionResult& selection, double heavy_eps);

}  // namespace levattn
