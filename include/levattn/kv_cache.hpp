// levattn/kv_cache.hpp: a key-value cache for decoding whose memory does not grow with the
// context (math.md 1.6, docs/design.md "KV cache"): it keeps the keys that can still be eps-heavy
// for x^2 attention, plus a window of recent tokens and the first (sink) tokens.
#pragma once
#include <memory>
#include <vector>

#include "levattn/attention.hpp"
#include "levattn/causal.hpp"

namespace levattn {

/// The most tokens between evictions: with at most this many, a head's stream never prunes on its
/// own (it does once its candidates exceed 1024 or more), so the cache depends on token counts
/// alone, not on how the tokens were split into append() calls.
inline constexpr index_t kMaxPruneEvery = 512;

struct KVCacheOptions {
  double eps = 0.01;     ///< keys whose prefix leverage score falls below eps are evicted, in (0, 1]
  index_t window = 64;   ///< the last `window` tokens are always kept
  index_t sinks = 4;     ///< the first `sinks` tokens are always kept
  index_t prune_every = kCausalBlock;  ///< tokens between evictions, 1 .. kMaxPruneEvery
  /// Evaluation: also keep every key and value, so that attend() can report the kernel's mass
  /// on the kept keys against the full cache (memory then grows with the context).
  bool keep_full = false;
  LeverageOptions leverage;  ///< exact scores, ridge 0; rank_rtol as in leverage_scores
};

/// What one attend() call reports.
struct KVCacheReport {
  std::vector<index_t> kept;  ///< keys attended per (batch, kv head), b * kv_heads + h
  /// With report_mass, per (batch, query head, query): the x^2 mass on the kept keys,
  /// sum_kept (q.k_j)^2 / q^T M q with M the Gram of every key appended (exact: M is kept), and,
  /// with keep_full, the call's kernel's mass on the kept keys against every key appended.
  std::vector<double> x2_mass, kernel_mass;
};

/// A KV cache of `batch` x `kv_heads` heads. Each head is a StreamingUniversalSet (keys and
/// values) pruned every prune_every tokens with its first `sinks` and last `window` keys
/// protected: a key is evicted only when its leverage score against every key so far is below
/// eps (less the scores' rounding), and prefix scores only fall, so no later query can find an
/// evicted key eps-heavy under x^2 attention (for any query: A_ij <= k_j^T M^+ k_j).
/// Memory per head O(d^2 + (d / eps + prune_every + window + sinks)(d + dv)), whatever the
/// number of tokens (keep_full aside). As for every score here, directions of M below
/// rank_rtol of its largest singular value count as null (causal.hpp). Not thread-safe for
/// concurrent calls on one object.
class KVCache {
 public:
  /// Throws Error(invalid_argument) on sizes < 1 (dv >= 1), eps outside (0, 1], window or sinks
  /// < 0, prune_every outside 1 .. kMaxPruneEvery, a ridge, or a sketch.
  KVCache(index_t batch, index_t kv_heads, index_t d, index_t dv, const KVCacheOptions& options = {});

  /// Appends t >= 0 tokens: keys (batch, kv_heads, t, d) and values (batch, kv_heads, t, dv),
  /// contiguous; pruning runs at every multiple of prune_every tokens, whatever the block sizes
  /// (so any split of the same tokens gives the same cache). O(t d^2) plus the prunes
  /// (O(d^3 + |C| d^2) each). Throws Error(invalid_argument) on shapes or non-finite entries
  /// (the cache is then unchanged).
  void append(const Tensor4Ref& keys, const Tensor4Ref& values);

  /// Attention of queries (batch, q_heads, tq, d) over the kept keys and values of their kv head
  /// (query head g reads kv head g / (q_heads / kv_heads): grouped-query attention), with the
  /// kernel, p and scale of `kernel`: out (batch, q_heads,
  /// tq, dv), caller-allocated. Every query sees every kept key (decoding: the queries of the
  /// newest tokens). O(q_heads tq |kept| (d + dv)); report_mass adds O(q_heads tq (|kept| d +
  /// d^2)) plus M for each kv head (O(1024 d^2) for its waiting rows) and, with keep_full,
  /// O(q_heads tq n d). Throws Error(invalid_argument) on shapes,
  /// q_heads not a multiple of kv_heads, non-finite queries, or an empty cache.
  KVCacheReport attend(const Tensor4Ref& queries, float* out, const KernelOptions& kernel = {},
                       bool report_mass = false) const;

  index_t tokens() const;  ///< tokens appended so far
  index_t batch() const;
  index_t kv_heads() const;
  index_t d() const;
  index_t dv() const;
  /// The token indices head (b, h) keeps, ascending (valid until the next append).
  const std::vector<index_t>& kept(index_t b, index_t h) const;
  std::size_t bytes() const;  ///< bytes the cache holds now

  ~KVCache();
  KVCache(KVCache&&) noexcept;
  KVCache& operator=(KVCache&&) noexcept;

 private:
  struct Impl;
  std::unique_ptr<Impl> p_;
};

}  // namespace levattn
