// levattn/evaluate.hpp: how well each selection fits a user's attention heads, measured against
// the full attention of those heads (the decision a user makes before touching a model).
#pragma once
#include <limits>
#include <string>
#include <vector>

#include "levattn/attention.hpp"

namespace levattn {

struct EvaluateOptions {
  double heavy_eps = 0.05;  ///< entries >= heavy_eps count as heavy, in (0, 1]
  double p = 4.0;           ///< the exponent of the |x|^p heavy recall, > 0
  /// The logit scale of every selection whose own scale is unset (NaN), for the selection and for
  /// the full attention it is measured against: heads whose queries already carry a scale (a
  /// model's own 1/sqrt(d)) need 1 here. NaN: each kernel's default (1/sqrt(d) for softmax). > 0.
  double scale = std::numeric_limits<double>::quiet_NaN();
};

/// One selection on one (batch, head) pair.
struct Evaluation {
  index_t pair = 0;          ///< b * heads + h
  /// describe(options) plus what was used where the options leave it open: the seed of random
  /// and cluster, cluster's probe, the scale when one was given: "cluster top_k=32 probe=9 seed=0".
  std::string selection;
  double keys_per_query = 0.0;  ///< mean |S_i| over the queries
  /// Mean over queries of sum_{j in S_i} softmax(scale q_i.k_j)_j (scale: the options' or 1/sqrt(d)).
  double softmax_mass = 0.0;
  /// ||O_S - O_full||_F / ||O_full||_F, O_full the full attention of the options' kernel.
  double output_error = 0.0;
  /// Fraction of the entries (q_i.k_j)^2 / sum_l (q_i.k_l)^2 >= heavy_eps whose key S_i holds
  /// (1 when there are none), and how many there are.
  double x2_heavy_recall = 1.0;
  index_t x2_heavy = 0;
  /// The same for |q_i.k_j|^p / sum_l |q_i.k_l|^p with EvaluateOptions::p.
  double power_heavy_recall = 1.0;
  index_t power_heavy = 0;
  /// The pair's leverage scores all tie (K of full row rank, n <= d): a leverage top-k is then
  /// an arbitrary tie-break (lowest indices), not a choice.
  bool scores_tied = false;
};

/// A selection from its text: "NAME[:VALUE]" then "+FIELD:VALUE" items, e.g. "leverage:32",
/// "leverage+eps:0.05+window:4", "topk:32", "random:32+sinks:2", "window:16", "cluster:32+probe:8",
/// "full". NAME is a Select name; VALUE is top_k (leverage, topk, random, cluster) or the window
/// (window). FIELD names an AttentionOptions field: top_k, eps, window, sinks, probe, clusters,
/// iterations (cluster_iterations), seed, p, kernel (softmax | poly), budget_alpha,
/// budget_exponent; or a LeverageOptions field: method (exact | sketch), ridge, rank_rtol, sketch
/// (countsketch | srht | gaussian), sketch_size, gamma, jl_columns, delta, sketch_seed (its seed).
/// Fields left out keep their defaults; values are not range-checked here (attention() does).
/// Throws Error(invalid_argument) naming the spec and what was expected.
AttentionOptions parse_selection(const std::string& spec);

/// The inverse of parse_selection: the spec of every field above that differs from its default,
/// numbers to 17 digits, so that parse_selection(selection_spec(o)) has o's values exactly (the
/// fields outside the spec, scale, causal, return_selection and progress, are not carried).
std::string selection_spec(const AttentionOptions& options);

/// A short name of a selection's options: select, budget, window, sinks, kernel if not softmax.
std::string describe(const AttentionOptions& options);

/// Every selection on every pair: the selection as attention() makes it, its output, and the
/// metrics above against the dense computation. Q (batch, heads, m, d), K (batch, heads, n, d),
/// V (batch, heads, n, dv). Rows are in (pair, selection) order. O(pairs (m n (d + dv) + cost of
/// each selection)) time, O(block n) memory per thread: an evaluation tool, not a production path.
/// Throws Error(invalid_argument) for bad inputs or options (the message names the selection).
std::vector<Evaluation> evaluate(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V,
                                 const std::vector<AttentionOptions>& selections,
                                 const EvaluateOptions& options = {});

}  // namespace levattn
