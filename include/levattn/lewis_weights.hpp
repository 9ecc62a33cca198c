// levattn/lewis_weights.hpp: l_p Lewis weights and the |x|^p sensitivity bounds they give
// (docs/design.md), the universal-set scores for attention with f(x) = |x|^p.
#pragma once
#include <vector>

#include "levattn/leverage_scores.hpp"

namespace levattn {

struct LewisOptions {
  double p = 2.0;                 ///< p in (0, 64]
  index_t max_iterations = 1000;  ///< iteration cap (convergence is linear, see lewis_weights)
  double tolerance = 1e-10;       ///< stop when max_i |log theta_i| (below) is at most this
  double rank_rtol = 1e-5;        ///< numerical rank of K, as LeverageOptions::rank_rtol
};

struct LewisWeights {
  std::vector<double> weights;  ///< w_j, size n, in [0, 1]; sum = rank
  index_t rank = 0;
  double p = 2.0;
  /// Fixed-point residual max_j |w_j - (k_j^T (K^T W^(1-2/p) K)^+ k_j)^(p/2)|, evaluated afresh
  /// from the returned weights.
  double residual = 0.0;
  index_t iterations = 0;
  bool converged = false;
};

/// The l_p Lewis weights of the rows of K (n x d): the unique w with
///   w_j = (k_j^T (K^T W^(1-2/p) K)^+ k_j)^(p/2),  sum_j w_j = rank(K).
///
/// Method: with M = (K^T W^(1-2/p) K)^+ the weights are w_j = (k_j^T M k_j)^(p/2). Each step forms
/// C = K^T diag((k_j^T M k_j)^(p/2-1)) K and T = M^1/2 C M^1/2 (T = I exactly at the fixed
/// point) and moves M <- M^1/2 T^-eta M^1/2 with eta = 4 / (p + 2). Linearised at the fixed point
/// this maps log-coordinates X to (1 - eta) X - eta (p/2 - 1) L(X) with L's spectrum in [0, 1], a
/// contraction with rate |p - 2| / (p + 2) < 1 for every p > 0: the plain iteration of Cohen and
/// Peng (eta = 1), which diverges for p >= 4, is the special case eta = 1. A safeguard halves eta
/// when the step measure max |log theta| grows. p = 2 gives the leverage scores in one step.
/// Work happens in float64 in the numerical range of K.
/// Cost per iteration: two BLAS-3 passes over K, O(n d^2); iterations ~ log(1/tol) / log(1/rate).
/// Throws Error(invalid_argument) on empty or non-finite K, p <= 0, bad options.
LewisWeights lewis_weights(ConstMatrix K, const LewisOptions& options);

/// Upper bounds t_j >= s_j on the |x|^p sensitivities s_j = sup_y |<y,k_j>|^p / sum_l |<y,k_l>|^p:
///   p >= 2:  t_j = rank^(p/2 - 1) w_j   (Cauchy-Schwarz in N = K^T W^(1-2/p) K, then Hoelder),
///   p <= 2:  t_j = w_j,
/// clipped to 1. sum_j t_j <= rank^max(1, p/2) <= d^max(1, p/2), so the universal set
/// { j : t_j >= eps } has at most d^max(1, p/2) / eps keys. Returned as LeverageScores so that
/// universal_set() and universal_set_top_k() apply; p = 2 gives exactly the leverage scores.
LeverageScores sensitivity_bounds(const LewisWeights& weights);

/// Scores whose eps-threshold is a universal set for f(x) = |x|^p: leverage_scores(K, options)
/// for p == 2, else sensitivity_bounds(lewis_weights(K, {p, ..., options.rank_rtol})). Throws
/// Error(invalid_argument) for p != 2 with a sketch or a ridge (they apply to leverage scores only),
/// and for p < 0.01 or p > 64 (the iteration's powers leave float64's range).
LeverageScores sensitivity_bounds(ConstMatrix K, double p, const LeverageOptions& options = {});

}  // namespace levattn
