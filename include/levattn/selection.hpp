// levattn/selection.hpp: the selection, the keys each query attends: the one currency that every
// selector produces (select_keys), attention consumes, evaluate measures and the CLI and the
// PyTorch op save.
#pragma once
#include <cstdint>
#include <vector>

#include "levattn/matrix.hpp"
#include "levattn/options.hpp"

namespace levattn {

/// Queries that share one draw of their rest (Selection::residual): a multiple of the engine's
/// query tiles, so that each tile meets one block's keys as one gathered block.
inline constexpr index_t kResidualBlock = 256;

/// The keys each query of every (batch, head) pair attends: all keys (select full), or the union
/// of three disjoint parts: a shared set per pair (leverage, random; sinks included) or per
/// segment of queries (causal leverage), the window band, and each query's own keys (select
/// topk, cluster); with `causal`, each part cut to the keys j <= i. A fourth part, disjoint from
/// them, may sample the rest: keys each query attends with a weight (sample_residual).
struct Selection {
  index_t batch = 0, heads = 0;  ///< pairs are numbered b * heads + h
  index_t m = 0, n = 0;          ///< queries and keys per pair
  bool all_keys = false;         ///< every query attends every key (nothing else is set)
  /// Query i attends only keys j <= i (autoregressive order): every part is intersected with it.
  bool causal = false;
  /// > 0: the queries of each pair fall into segments of `segment` (the last one shorter), each
  /// with its own shared set: query i uses shared_keys[h * segments() + i / segment]. 0: one
  /// shared set per pair.
  index_t segment = 0;
  /// The keys every query of a pair (or segment) attends, ascending and distinct; empty (no pair
  /// has any) or pairs() * segments() entries.
  std::vector<std::vector<index_t>> shared_keys;
  /// >= 0: query i also attends the keys j with |i - j| <= window (causal: i - window <= j <= i)
  /// that are not in its shared set.
  index_t window = -1;
  /// > 0: each query's own keys, query_keys (pairs, m, top_k): distinct, none of them in its
  /// shared set or window (causal: none after i), -1 for an unused slot. Any order is attended;
  /// the selections write each row ascending, its unused slots last.
  index_t top_k = 0;
  std::vector<index_t> query_keys;
  /// > 0: keys sampled from the rest (math.md 1.8), one draw per residual block: the queries of
  /// each segment fall into blocks of kResidualBlock (the last one shorter), and block b of pair
  /// h draws residual_keys (pairs, residual_blocks(), residual): distinct, ascending, -1 for an
  /// unused slot at the end, from its rest U_hb (open keys, below its last query + 1 if causal,
  /// not in its segment's shared set). Query i attends those of its block's keys that no other
  /// part gives it (nor, causal, after i), each with the weight residual_weight (pairs,
  /// residual_blocks()) > 0 multiplying its kernel value (softmax: log weight added to its
  /// logit). sample_residual makes them.
  index_t residual = 0;
  std::vector<index_t> residual_keys;
  std::vector<double> residual_weight;
  /// Key padding, (batch, n): 0 for a key no query of that batch attends, in any part (the
  /// shared sets and query keys never hold one; the window band and all_keys skip it); empty:
  /// none.
  std::vector<std::uint8_t> key_mask;

  index_t pairs() const { return batch * heads; }
  index_t segments() const { return segment > 0 && m > 0 ? (m + segment - 1) / segment : 1; }
  /// Residual blocks per pair (a segment's queries in blocks of kResidualBlock), and query i's.
  index_t residual_blocks() const { return segments() * blocks_per_segment(); }
  index_t residual_block(index_t i) const {
    const index_t len = segment > 0 ? segment : m;
    return i / len * blocks_per_segment() + i % len / kResidualBlock;
  }
  /// The shared set query i of pair h attends (an empty one when there are none).
  const std::vector<index_t>& shared_of(index_t h, index_t i) const;
  /// Whether key j of pair h's batch may be attended (false when key_mask masks it).
  bool key_open(index_t h, index_t j) const {
    return key_mask.empty() || key_mask[static_cast<std::size_t>(h / heads * n + j)] != 0;
  }
  /// mask[j] = 1 if query i of pair h attends key j, else 0, for j in [0, n): the one definition
  /// of "attends" (every part, the causal cut and the key mask; sampled keys included, whatever
  /// their weight). O(n + |shared| + top_k + residual).
  void mask_row(index_t h, index_t i, char* mask) const;
  /// Every field equal: the same keys for every query, in the same form.
  friend bool operator==(const Selection&, const Selection&) = default;
  /// |S_i| for every query, (pairs, m) row-major, sampled keys included: O(pairs m (log |shared| +
  /// (top_k + 1) log residual)).
  std::vector<index_t> keys_per_query() const;
  /// Residual blocks per segment.
  index_t blocks_per_segment() const {
    const index_t len = segment > 0 ? segment : m;
    return len > 0 ? (len + kResidualBlock - 1) / kResidualBlock : 1;
  }
};

/// The selection attention(Q, K, V, options) makes, without attending: the same keys (same
/// scores, streams and tie-breaks) as its `return_selection`. Shapes: Q (batch, heads, m, d),
/// K (batch, heads, n, d). Cost: that of the selection alone (leverage O(n d^2) per pair; causal
/// leverage O(n d^2 + (n / 256)(d^3 + |C| d^2)) and its sets' sizes in memory; topk O(m n d)). Throws Error(invalid_argument) as attention() does for these inputs and options.
Selection select_keys(const Tensor4Ref& Q, const Tensor4Ref& K, const AttentionOptions& options);

/// Adds the residual part to `selection` (math.md 1.8): for block b of pair h (residual_block),
/// with U its rest (open keys, below the block's last query + 1 if causal, outside its segment's
/// shared set), `r` keys drawn uniformly without replacement from U with the stream (seed,
/// residual_sample, h residual_blocks() + b), weighted by |U| / r; all of U with weight 1 when
/// |U| <= r. Every key of a query's rest R_i (U less its band, own keys and, causal, the keys
/// after it) is then drawn with probability r / |U|, so the kept keys count exactly and the
/// sampled ones estimate the rest without bias: with e_j the kernel value, E[(|U| / r)
/// sum_{sampled in R_i} e_j] = sum_{R_i} e_j, and likewise for the numerator sum e_j v_j
/// (Horvitz-Thompson; the output, a ratio of the two, has a bias O(1/r)). Variance at most
/// (|U| / r) sum_{R_i} e_j^2, so with x^2 and U_eps kept the normaliser's relative standard
/// deviation is at most sqrt(|U| eps / r). The queries of a block share their draw (as
/// HyperAttention's sampled columns are shared), so that attending it is one gathered block per
/// query tile; their errors are correlated, each one's distribution is as above. The same bits
/// for any thread count. Cost: expected O(r log r) per block (each draw accepted with
/// probability >= 1/4), O(n) for a block whose rest holds under a quarter of its keys (drawn from
/// the enumerated rest), plus O(n) per thread for marks. Throws Error(invalid_argument) for r <
/// 1, n >= 2^32, a selection of all keys (no rest) or one that already has a residual part.
void sample_residual(Selection& selection, index_t r, std::uint64_t seed);

/// Shapes of one differentiable call: Q (batch, heads, m, d), K (batch, kv, n, d),
/// V (batch, kv, n, dv), all contiguous row-major, with kv = kv_heads (0: heads) dividing heads:
/// grouped-query attention, query head h reading kv head h / (heads / kv) in place (no copy).
struct AttentionShape {
  index_t batch = 1, heads = 1, m = 0, n = 0, d = 0, dv = 0;
  index_t kv_heads = 0;

  index_t kv() const { return kv_heads > 0 ? kv_heads : heads; }
  /// The (batch, kv head) pair of K and V that query pair b * heads + h reads.
  index_t kv_pair(index_t pair) const { return pair / heads * kv() + pair % heads / (heads / kv()); }
};

/// The fields of the Selection that select_keys returns for inputs of this shape and these
/// options which do not depend on the data: batch, heads, m, n, all_keys, causal, segment,
/// window, top_k and residual (shared_keys, query_keys and the residual part are left empty). O(1); throws
/// Error(invalid_argument) as select_keys does for bad options or shapes.
Selection selection_layout(const AttentionShape& shape, const AttentionOptions& options);

/// The shared sets of a selection as one array of fixed size, (pairs, n): for key j of pair h,
/// the last segment whose shared set holds j, or -1 when none does. It is exact because every
/// producer's sets hold each key over one run of segments: from segment 0, or under causal
/// attention from j's own segment j / segment on (earlier segments' queries cannot see j, so
/// memberships there are dropped). Together with query_keys (pairs, m, top_k) and the layout it
/// gives back an equivalent selection (selection_from_arrays): the form whose size depends only on
/// the shape and options, which the PyTorch op returns. O(pairs n + sum of the sets' sizes).
/// Throws Error(internal) for sets that are not of that form.
std::vector<index_t> key_segments(const Selection& selection);

/// The inverse of key_segments: `layout` (as selection_layout gives it) with its shared sets
/// rebuilt from key_segments (pairs, n) and query_keys (pairs, m, top_k) copied in (null when
/// layout.top_k is 0), and residual_keys (pairs, residual_blocks(), residual) and residual_weight
/// (pairs, residual_blocks()) (null when layout.residual is 0). Attends exactly the keys of the selection the arrays were made from (give
/// it the same key_mask, which the arrays do not carry).
/// O(pairs n + sum of the sets' sizes). Throws Error(invalid_argument) on an entry of
/// key_segments outside [-1, segments) or before its key's first segment; query_keys and the
/// residual part are checked where the selection is used (selected_attention_forward).
Selection selection_from_arrays(const Selection& layout, const index_t* key_segments, const index_t* query_keys,
                                const index_t* residual_keys = nullptr, const double* residual_weight = nullptr);

}  // namespace levattn
