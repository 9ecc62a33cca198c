// levattn/leverage_scores.hpp: exact leverage scores of a key matrix (math.md 1.1).
#pragma once
#include <vector>

#include "levattn/matrix.hpp"

namespace levattn {

struct LeverageOptions {
  /// Ridge lambda >= 0: scores k_j^T (K^T K + lambda I)^+ k_j. With lambda > 0 they sum to
  /// trace(M (M + lambda I)^-1) < rank and are the ridge leverage scores.
  double ridge = 0.0;
  /// Numerical rank: singular values of K below rank_rtol * sigma_max count as zero (their
  /// directions are dropped from the pseudo-inverse). float32 input carries about 7 digits, so
  /// the default treats a condition number above 1e5 as rank deficiency; 1e-5 keeps K with
  /// condition number up to 1e5 at full rank and drops exact duplicates / zero directions.
  double rank_rtol = 1e-5;
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
  bool triangular = false;
  std::vector<double> eigenvalues;  ///< eigenvalues of M (plus ridge), descending, size d
};

/// M = K^T K in float64 and B with (M + ridge I)^+ = B B^T, from a symmetric eigendecomposition.
/// K: n x d (n >= 1, d >= 1), finite. O(n d^2) time, O(d^2) workspace plus one block of K.
/// Deterministic: the result does not depend on the thread count.
KeyGram key_gram(ConstMatrix K, const LeverageOptions& options = {});

/// Leverage scores of the rows of K and the accuracy they were computed with.
struct LeverageScores {
  std::vector<double> scores;  ///< tau_j, size n, each in [0, 1]
  index_t rank = 0;            ///< numerical rank of K; sum(scores) == rank up to rel_error_bound
  /// Proven bound on |computed tau_j - tau_j| / tau_j from floating-point rounding in the second
  /// pass (float32 GEMM when K is well conditioned, float64 otherwise); universal sets lower
  /// their threshold by this factor to stay guaranteed supersets.
  double rel_error_bound = 0.0;
};

/// Leverage scores tau_j = k_j^T (K^T K + ridge I)^+ k_j of the rows of K (n x d).
///
/// tau_j is the squared norm of row j of an orthonormal basis of range(K), equal to the
/// x^2-sensitivity of key j: max over queries of (q.k_j)^2 / sum_l (q.k_l)^2 (math.md 1.1).
/// Correct for rank-deficient K (duplicate or zero keys, n < d): the pseudo-inverse is used and
/// sum_j tau_j = rank(K). Invariant under K -> K R for invertible R and equivariant under row
/// permutations.
/// Complexity: O(n d^2) time (two passes over K, both BLAS-3), O(d^2 + block * d) workspace.
/// Throws Error(invalid_argument) on empty K, non-finite entries, ridge < 0 or non-finite.
LeverageScores leverage_scores(ConstMatrix K, const LeverageOptions& options = {});

/// Scores of the rows of K against an already computed Gram factor (the rows need not be the
/// rows the Gram was computed from). Used by leverage_scores and by the streaming structure.
LeverageScores leverage_scores(ConstMatrix K, const KeyGram& gram);

}  // namespace levattn
