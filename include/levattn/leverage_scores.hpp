// levattn/leverage_scores.hpp: exact leverage scores of a key matrix (docs/design.md).
#pragma once
#include <string>
#include <vector>

#include "levattn/matrix.hpp"
#include "levattn/sketch.hpp"

namespace levattn {

/// How leverage scores are computed.
enum class ScoreMethod {
  exact,   ///< float64 Gram matrix and a rank-revealing eigendecomposition (docs/design.md)
  sketch,  ///< sketch-and-precondition (docs/design.md): the Gram matrix of S K replaces K^T K
};

/// "exact" / "sketch", and the inverse (Error(invalid_argument) naming the choices otherwise).
std::string to_string(ScoreMethod method);
ScoreMethod parse_score_method(const std::string& name);

struct LeverageOptions {
  /// Ridge lambda >= 0: scores k_j^T (K^T K + lambda I)^+ k_j. With lambda > 0 they sum to
  /// trace(M (M + lambda I)^-1) < rank and are the ridge leverage scores.
  double ridge = 0.0;
  /// Numerical rank: singular values of K below rank_rtol * sigma_max count as zero (their
  /// directions are dropped from the pseudo-inverse). float32 input carries about 7 digits, so
  /// the default treats a condition number above 1e5 as rank deficiency; 1e-5 keeps K with
  /// condition number up to 1e5 at full rank and drops exact duplicates / zero directions.
  double rank_rtol = 1e-5;

  ScoreMethod method = ScoreMethod::exact;
  // The sketch path (method == sketch):
  SketchKind sketch = SketchKind::countsketch;  ///< the embedding S
  /// Rows s of S; 0 means s = ceil((sqrt(d) + sqrt(2 ln(2/delta)))^2 / e^2) with e chosen so that
  /// the stated accuracy is gamma. With s >= n the exact method is used (it is then cheaper).
  index_t sketch_size = 0;
  double gamma = 0.2;        ///< target accuracy of sketched scores, in (0, 1)
  /// JL compression (for large d): scores ||k_j^T R^-1 G||^2 with G a d x t Gaussian, O(n d t)
  /// instead of O(n d^2). 0 (default) or t >= rank: none.
  index_t jl_columns = 0;
  double delta = 0.01;       ///< failure probability of the sketch (and of the JL step), in (0, 1)
  std::uint64_t seed = 0;    ///< the sketch is a pure function of (kind, seed, n, s)
};

/// The Gram matrix of K and its pseudo-inverse factor, reusable for scores and for the exact row
/// normalisers of x^2 attention (q^T M q).
struct KeyGram {
  index_t d = 0;
  index_t rank = 0;
  double ridge = 0.0;
  std::vector<double> gram;     ///< M = K^T K, d x d row-major, accumulated in float64
  std::vector<double> factor;   ///< B (d x rank): M^+ = B B^T (ridge: (M + lambda I)^-1 = B B^T)
  /// B is upper triangular (d x d), the inverse transposed Cholesky factor of M + ridge I; set
  /// when M is numerically full rank. Otherwise B = V_r Lambda_r^-1/2 from the eigenvectors.
  /// Well-conditioned M (min(trace(M), ||M||_inf) trace(M^-1) < 1 / rank_rtol^2, no ridge) is
  /// recognised from one Cholesky factorisation, without an eigensolver.
  bool triangular = false;
  /// sum over the retained directions of lambda_max / lambda_i (eigenvalues of M + ridge I), and
  /// lambda_max / lambda_min: exact from the eigensolver, or the upper bound
  /// min(trace(M), ||M||_inf) trace(M^-1) on the Cholesky path. They enter the scores' rounding
  /// bound.
  double condition_sum = 0.0;
  double condition = 0.0;
};

/// M = K^T K in float64 and B with (M + ridge I)^+ = B B^T, from a Cholesky factorisation when M
/// is well conditioned, else a symmetric eigendecomposition (rank-revealing).
/// K: n x d (n >= 1, d >= 1), finite. O(n d^2 + d^3) time, O(d^2) workspace plus one block of K.
/// Deterministic: the result does not depend on the thread count.
KeyGram key_gram(ConstMatrix K, const LeverageOptions& options = {});

/// Leverage scores of the rows of K and the accuracy they were computed with.
struct LeverageScores {
  std::vector<double> scores;  ///< tau_j, size n, each in [0, 1]
  index_t rank = 0;            ///< numerical rank of K; sum(scores) == rank up to rel_error_bound
  /// gamma with tau_j / (1 + gamma) <= computed tau_j <= tau_j (1 + gamma). Exact method: a
  /// proven bound on the rounding of the second pass (float32 GEMM when K is well conditioned,
  /// float64 otherwise). Sketch method: the stated accuracy, holding with probability
  /// >= 1 - failure_probability. Universal sets threshold at eps / (1 + gamma), so that they stay
  /// supersets of the exact U_eps.
  double rel_error_bound = 0.0;
  /// A proven upper bound on the sum of the exact scores: rank for leverage scores,
  /// rank^max(1, p/2) for |x|^p sensitivity bounds (0: unknown, the computed sum is used).
  double sum_bound = 0.0;
  ScoreMethod method = ScoreMethod::exact;  ///< the method actually used
  index_t sketch_size = 0;                  ///< sketch: rows of S
  double failure_probability = 0.0;         ///< sketch: probability that rel_error_bound fails
};

/// Leverage scores tau_j = k_j^T (K^T K + ridge I)^+ k_j of the rows of K (n x d).
///
/// tau_j is the squared norm of row j of an orthonormal basis of range(K), equal to the
/// x^2-sensitivity of key j: max over queries of (q.k_j)^2 / sum_l (q.k_l)^2 (docs/design.md).
/// Correct for rank-deficient K (duplicate or zero keys, n < d): the pseudo-inverse is used and
/// sum_j tau_j = rank(K). Invariant under K -> K R for invertible R and equivariant under row
/// permutations.
/// Complexity: O(n d^2) time (two passes over K, both BLAS-3), O(d^2 + block * d) workspace.
///
/// With options.method == sketch (docs/design.md): Y = S K (s x d, sketch.hpp) and
/// tau~_j = k_j^T (Y^T Y)^+ k_j = ||k_j^T R^+||^2 for Y = Q R (optionally through a JL matrix G). If S embeds range(K) with
/// distortion e, every tau~_j / tau_j lies in [(1 + e)^-2, (1 - e)^-2]; with JL error e_J, in
/// [(1 - e_J)(1 + e)^-2, (1 + e_J)(1 - e)^-2]. The stated gamma uses the Gaussian embedding bound
/// e = (sqrt(r) + sqrt(2 ln(2/delta))) / sqrt(s), r the numerical rank (Davidson-Szarek; proven for gaussian, the same
/// formula for srht and countsketch, whose proven bounds need larger s: see docs/design.md) and
/// e_J = sqrt(8 ln(2n/delta) / t). Time O(nnz(K) + s d^2 + n d^2) (countsketch), O(n d t) with JL.
/// Throws Error(invalid_argument) on empty K, non-finite entries, ridge < 0 or non-finite,
/// gamma or delta outside (0, 1), a ridge with the sketch method.
LeverageScores leverage_scores(ConstMatrix K, const LeverageOptions& options = {});

/// Scores of the rows of K against an already computed Gram factor (the rows need not be the
/// rows the Gram was computed from). Used by leverage_scores and by the streaming structure.
LeverageScores leverage_scores(ConstMatrix K, const KeyGram& gram);

}  // namespace levattn
