// levattn/options.hpp: the vocabulary of attention: the selection of keys and its options (over
// the kernel of kernel.hpp), and the selection spec text ("leverage:32+window:4") that names a selection
// everywhere (the CLI, Python, the integrations, evaluate).
#pragma once
#include <cstdint>
#include <functional>
#include <limits>
#include <string>

#include "levattn/kernel.hpp"
#include "levattn/leverage_scores.hpp"
#include "levattn/matrix.hpp"

namespace levattn {

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

/// The kernel and the selection of one attention call (the selection depends on the kernel:
/// leverage with the power kernel and p != 2 ranks keys by |x|^p sensitivity bounds).
struct AttentionOptions : KernelOptions {
  Select select = Select::full;
  index_t top_k = 0;   ///< leverage / topk / random / cluster budget
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
  /// > 0: each block of 256 queries also draws `residual` keys uniformly without replacement
  /// (by seed) from the keys its selection leaves out (U), each weighted |U| / residual, and each
  /// query attends those its other parts do not give it: the kept keys exactly, the dropped mass
  /// and its output estimated without bias (math.md 1.8; sample_residual in selection.hpp). Not
  /// with select full, which drops nothing.
  index_t residual = 0;
  LeverageOptions leverage;  ///< options of the leverage scores used by Select::leverage
  /// Key padding: (batch, n) bytes, 0 for a key no query may attend (nor select), else 1; null:
  /// every key. Each selection is made as if the masked keys were not there (leverage scores of
  /// the others, random draws among them, top-k and clusters searching them only, sinks the first
  /// `sinks` unmasked keys) and no query attends one (nor its window band, nor `full`). Taken by
  /// attention(), select_keys and the differentiable pair (selected_attention.hpp).
  const std::uint8_t* key_mask = nullptr;
  bool return_selection = false;  ///< fill AttentionResult::selection
  /// Called now and then from the calling thread with the fraction of work done, in [0, 1].
  std::function<void(double)> progress;
};

/// ceil(alpha * n^exponent), at least 1 and at most n: the n^C-adaptive key budget.
/// Throws Error(invalid_argument) unless alpha > 0 and exponent in (0, 1] are finite.
index_t adaptive_budget(index_t n, double alpha, double exponent);

/// Select::cluster's default probe for c clusters of n keys and a budget of top_k keys:
/// max(kMinProbe, ceil(c / kProbeDivisor), ceil(2 top_k c / n), ceil(min(n / 4, kMinCandidates) c / n)),
/// at most c: enough clusters for about twice the budget in candidates (4 of 128 clusters at
/// n = 16384 and 8 of 256 at n = 65536 for top_k = 256: recall 0.98 and 1.0 of the exact top-256
/// on grouped keys), and for a quarter of the keys, up to kMinCandidates, where a dense pass is
/// cheap (6 of 23 at n = 512: 0.93 of the exact top-16's softmax mass on all-MiniLM-L6-v2's
/// heads, against 0.89 with 4; docs/benchmarks.md).
inline constexpr index_t kMinProbe = 4;
inline constexpr double kProbeDivisor = 32.0;
inline constexpr double kMinCandidates = 256.0;
index_t default_probe(index_t clusters, index_t n, index_t top_k);

/// The name used by the CLI and in messages: "full", "leverage", ...
std::string to_string(Select s);

/// The inverse of to_string. Throws Error(invalid_argument) naming the choices for any other name.
Select parse_select(const std::string& name);

/// A selection from its text: "NAME[:VALUE]" then "+FIELD:VALUE" items, e.g. "leverage:32",
/// "leverage+eps:0.05+window:4", "topk:32", "random:32+sinks:2", "window:16", "cluster:32+probe:8",
/// "full". NAME is a Select name; VALUE is top_k (leverage, topk, random, cluster) or the window
/// (window). FIELD names an AttentionOptions field: top_k, eps, window, sinks, probe, clusters,
/// iterations (cluster_iterations), seed, residual, p, kernel (softmax | poly), budget_alpha,
/// budget_exponent; or a LeverageOptions field: method (exact | sketch), ridge, rank_rtol, sketch
/// (countsketch | srht | gaussian), sketch_size, gamma, jl_columns, delta, sketch_seed (its seed).
/// Fields left out keep their defaults; values are not range-checked here (attention() does).
/// Throws Error(invalid_argument) naming the spec and what was expected.
AttentionOptions parse_selection(const std::string& spec);

/// The inverse of parse_selection, and the one name of a selection (the CLI's JSON, evaluate's
/// rows, the PyTorch op): NAME[:VALUE] with the budget as VALUE ("leverage:32", "window:16"), then
/// +FIELD:VALUE for every other field above that differs from its default, in a fixed order,
/// numbers in their shortest round-trip form, so that parse_selection(selection_spec(o)) has o's
/// values exactly and equal options have equal specs (the fields outside the spec, scale,
/// causal, key_mask, return_selection and progress, are not carried).
std::string selection_spec(const AttentionOptions& options);

}  // namespace levattn
