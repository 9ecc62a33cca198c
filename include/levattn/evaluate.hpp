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
  /// The selection's spec (selection_spec) with what was used where the options leave it open,
  /// cluster's probe: "cluster:32+probe:9"; empty from selection_metrics (it gets no options).
  std::string selection;
  double scale = 0.0;  ///< the logit scale used (the options', EvaluateOptions', or the kernel's default)
  double keys_per_query = 0.0;  ///< mean |S_i| over the queries
  /// Mean over queries of sum_{j in S_i} softmax(scale q_i.k_j)_j (scale: the options' or 1/sqrt(d)).
  double softmax_mass = 0.0;
  /// The same for the weights A_ij of full attention under the selection's own kernel (equal to
  /// softmax_mass for softmax), and the fraction of the entries A_ij >= heavy_eps whose key S_i
  /// holds (1 when there are none), and how many there are.
  double kernel_mass = 0.0;
  double kernel_heavy_recall = 1.0;
  index_t kernel_heavy = 0;
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

/// Every selection on every pair: the selection as attention() makes it (return_selection), its
/// output, and the metrics above against the full attention of the same kernel, formed row block
/// by row block (no n x n buffer). Q (batch, heads, m, d), K (batch, heads, n, d),
/// V (batch, heads, n, dv). Rows are in (pair, selection) order. O(pairs (m n (d + dv) + cost of
/// each selection)) time, O(block n) memory per thread: an evaluation tool, not a production path.
/// Throws Error(invalid_argument) for bad inputs or options (the message names the selection).
std::vector<Evaluation> evaluate(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V,
                                 const std::vector<AttentionOptions>& selections,
                                 const EvaluateOptions& options = {});

/// The metrics above for one head's selection and the output attention() gave with it (the same
/// evaluator as evaluate()): Q (m, d), K (n, d), V (n, dv), approx (m, dv); `selection` is one
/// pair's (AttentionResult::selection of that call, or select_keys'), `kernel` its kernel (an
/// unset scale takes options.scale, then the kernel's default). A selection's key mask counts:
/// masked keys are outside full attention too. O(m n (d + dv)) time, O(block n) memory per thread.
/// Throws Error(invalid_argument) for bad inputs, a selection of another shape, or a causal one
/// (full attention here is not causal).
Evaluation selection_metrics(ConstMatrix Q, ConstMatrix K, ConstMatrix V, const float* approx,
                             const KernelOptions& kernel, const Selection& selection,
                             const EvaluateOptions& options = {});

}  // namespace levattn
