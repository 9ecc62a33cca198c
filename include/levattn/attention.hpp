// levattn/attention.hpp: attention over a selection of keys (docs/design.md), and the dense reference.
#pragma once
#include <vector>

#include "levattn/matrix.hpp"
#include "levattn/options.hpp"
#include "levattn/selection.hpp"

namespace levattn {

/// What attention() did, besides writing the output.
struct AttentionResult {
  /// The keys every query attended (with return_selection; else empty): the Selection that
  /// select_keys gives for the same inputs and options.
  Selection selection;
  std::vector<index_t> shared_sizes;  ///< |shared set| per (batch, head) (causal leverage: the largest)
  index_t top_k = 0;                  ///< the key budget used (an adaptive budget resolved)
  double mean_keys_per_query = 0.0;   ///< average |S_i| over all queries (window included)
  /// Queries whose selection is empty or whose normaliser is zero; their output row is 0.
  index_t empty_rows = 0;
  /// Select::cluster: queries whose probed clusters held fewer than top_k keys they may attend,
  /// so their own keys fall short of top_k (a larger probe finds more; under causal attention
  /// the first queries have fewer keys to choose from). 0 for the other selections.
  index_t short_queries = 0;
  /// The shared selections (leverage scores and sets, random sets) when they run as a phase of
  /// their own (few (batch, head) pairs); 0 when each pair's selection runs inside its task
  /// (many pairs) and for topk, whose per-query search is part of each block's attention.
  double seconds_selection = 0.0;
  double seconds_attention = 0.0;  ///< the rest of the call: the attention (and fused selections)
};

/// O = D^-1 f(scale Q K_S^T) V_S for each query over its selection S_i, normalised over S_i.
///
/// Shapes: Q (batch, heads, m, d), K (batch, heads, n, d), V (batch, heads, n, dv), all
/// contiguous; out (batch, heads, m, dv) caller-allocated. Each (batch, head) pair gets its own
/// selection. Window positions compare query index i with key index j (self-attention layout).
/// Complexity per head: full O(m n d) time, O((block + dv) * tile) workspace per thread;
/// leverage O(n d^2 + m |S| d); window adds O(m w d); topk O(m n d) time, O(m k) memory.
/// Softmax subtracts the running row maximum, so logits of any finite size stay finite.
/// Throws Error(invalid_argument) on mismatched shapes, empty or non-finite arrays, eps outside
/// (0, 1], p <= 0, non-finite scale, a budget < 1, or an inconsistent selection.
AttentionResult attention(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V,
                          float* out, const AttentionOptions& options = {});

/// Convenience for one head: Q (m, d), K (n, d), V (n, dv); returns O (m, dv) row-major.
std::vector<float> attention(ConstMatrix Q, ConstMatrix K, ConstMatrix V,
                             const AttentionOptions& options = {},
                             AttentionResult* result = nullptr);

}  // namespace levattn
