// levattn/attention.hpp: attention over a selection of keys (docs/design.md), and the dense reference.
#pragma once
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "levattn/leverage_scores.hpp"

namespace levattn {

/// f applied to the scaled logits s = scale * q.k.
enum class Kernel {
  softmax,  ///< f(s) = exp(s), scale 1/sqrt(d) by default
  power,    ///< f(s) = |s|^p, scale 1 by default
};

/// Which keys each query attends to. `full` and `topk` stand alone; `leverage` and `random`
/// combine with a window and sinks (union); `window` is local attention (window and/or sinks).
enum class Select {
  full,      ///< every key: the dense reference (tiled online softmax, no n x n buffer)
  leverage,  ///< keys by leverage score: top_k keys if top_k > 0, else U_eps (eps > 0); with
             ///< the power kernel and p != 2, by the |x|^p sensitivity bounds (Lewis weights)
  topk,      ///< per query, the top_k keys of largest f(s): the exact oracle, O(m n d) time
  random,    ///< top_k keys drawn uniformly without replacement per (batch, head), by seed
  window,    ///< no shared keys: only the window and sinks (local attention)
  cluster,   ///< per query, its top_k keys among those of its `probe` nearest key clusters
             ///< (k-means, by seed): query-aware, sub-quadratic; unions with window, sinks and U_eps
};

struct AttentionOptions {
  Kernel kernel = Kernel::softmax;
  double p = 2.0;  ///< exponent of the power kernel, > 0
  /// Logit scale; NaN means the default (1/sqrt(d) for softmax, 1 for power). Must be finite.
  double scale = std::numeric_limits<double>::quiet_NaN();
  Select select = Select::full;
  index_t top_k = 0;   ///< leverage / topk / random budget
  /// n^C-adaptive budget ("attention is naturally n^C-sparse"): when budget_alpha > 0, top_k = ceil(alpha * n^C) with
  /// C = budget_exponent in (0, 1], for topk, leverage and random; top_k must then be 0.
  double budget_alpha = 0.0;
  double budget_exponent = 0.0;
  double eps = 0.0;    ///< leverage threshold, in (0, 1] when used
  index_t window = -1; ///< >= 0: query i also attends keys i-window .. i+window
  index_t sinks = 0;   ///< >= 0: every query also attends keys 0 .. sinks-1
  /// Causal (autoregressive) attention: query i attends keys 0 .. i only, in every selection
  /// (m == n). Select::leverage then takes eps and uses, for the queries of each block of
  /// kCausalBlock, the causal universal set of the keys before the block plus the block's own
  /// keys (causal.hpp: every eps-heavy causal x^2 entry is kept); topk ranks keys 0 .. i; random
  /// and window cut their keys at i; cluster searches keys 0 .. i (its clusters are trained on
  /// all keys, so a query's choice, not its output's support, depends on later keys).
  bool causal = false;
  std::uint64_t seed = 0;  ///< random selection, cluster initial centroids
  /// Select::cluster: clusters per head (0: ceil(sqrt(n))), clusters each query searches (0:
  /// default_probe(clusters)) and the most k-means steps. With eps > 0 the shared set U_eps
  /// (leverage scores) is added; window and sinks add as for the other selections.
  index_t clusters = 0;
  index_t probe = 0;
  index_t cluster_iterations = 8;
  LeverageOptions leverage;  ///< options of the leverage scores used by Select::leverage
  /// Key padding: (batch, n) bytes, 0 for a key no query may attend (nor select), else 1; null:
  /// every key. Each selection is made as if the masked keys were not there (leverage scores of
  /// the others, random draws among them, top-k and clusters searching them only, sinks the first
  /// `sinks` unmasked keys) and no query attends one (nor its window band, nor `full`). Taken by
  /// select_keys and the differentiable pair (selected_attention.hpp); attention() refuses it.
  const std::uint8_t* key_mask = nullptr;
  bool return_selection = false;  ///< fill AttentionResult::shared_keys / query_keys
  /// Called now and then from the calling thread with the fraction of work done, in [0, 1].
  std::function<void(double)> progress;
};

/// What attention() did, besides writing the output.
struct AttentionResult {
  /// Per (batch, head) pair, in b * heads + h order: the keys every query of that head attends
  /// (leverage or random set plus sinks), ascending. Filled when return_selection is set. With
  /// segment > 0 (causal leverage), one set per (pair, block of `segment` queries) instead, at
  /// pair * blocks + block.
  std::vector<std::vector<index_t>> shared_keys;
  index_t segment = 0;
  /// Select::topk and cluster with return_selection: (batch, heads, m, top_k) key indices, each
  /// query's own keys in descending order of f(s); -1 in the slots beyond its candidates (cluster,
  /// and causal topk for a query i with i + 1 < top_k).
  std::vector<index_t> query_keys;
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

/// ceil(alpha * n^exponent), at least 1 and at most n: the n^C-adaptive key budget.
/// Throws Error(invalid_argument) unless alpha > 0 and exponent in (0, 1] are finite.
index_t adaptive_budget(index_t n, double alpha, double exponent);

/// The logit scale a call uses: options.scale, or its kernel's default (1/sqrt(d) for softmax,
/// 1 for power) when that is NaN.
double logit_scale(const AttentionOptions& options, index_t d);

/// Select::cluster's default probe for c clusters of n keys and a budget of top_k keys:
/// max(kMinProbe, ceil(c / kProbeDivisor), ceil(2 top_k c / n)), at most c: enough clusters for
/// about twice the budget in candidates (4 of 128 clusters at n = 16384 and 8 of 256 at n = 65536
/// for top_k = 256: recall 0.99 and 1.0 of the exact top-256 on grouped keys, docs/benchmarks.md).
inline constexpr index_t kMinProbe = 4;
inline constexpr double kProbeDivisor = 32.0;
index_t default_probe(index_t clusters, index_t n, index_t top_k);

/// Names used by the CLI and in messages: "softmax"/"poly", "full"/"leverage"/...
std::string to_string(Kernel k);
std::string to_string(Select s);

/// The inverses of to_string ("power" is accepted for "poly"). Throw Error(invalid_argument)
/// naming the choices for any other name.
Kernel parse_kernel(const std::string& name);
Select parse_select(const std::string& name);

}  // namespace levattn
