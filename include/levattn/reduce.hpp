// levattn/reduce.hpp: feature-dimension reduction for over-parameterised attention. Given
// X (n x d) with d >> n, find Y (n x m), m << d, whose softmax Gram matrix D(Y)^-1 exp(Y Y^T) is
// close to that of X (Deng, Song et al., "Randomized and Deterministic Attention Sparsification
// Algorithms for Over-parameterized Feature Dimension"): random sketches of the feature
// dimension, the exact SVD, or deterministic BSS column sparsification.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "levattn/matrix.hpp"

namespace levattn {

/// How Y is computed from X.
enum class ReduceMethod {
  gaussian,     ///< Y = X S^T, S an m x d Gaussian sketch (sketch.hpp)
  srht,         ///< Y = X S^T, S an m x d subsampled randomised Hadamard transform
  countsketch,  ///< Y = X S^T, S an m x d CountSketch
  svd,          ///< Y = U_m Sigma_m from the thin SVD X = U Sigma V^T
  bss,          ///< Y = the columns of X chosen by Batson-Spielman-Srivastava, reweighted
};

/// "gaussian", "srht", "countsketch", "svd" or "bss".
std::string to_string(ReduceMethod method);

/// The inverse of to_string. Throws Error(invalid_argument)
/// "method: expected gaussian, srht, countsketch, svd or bss, got 'x'" for anything else.
ReduceMethod parse_reduce_method(const std::string& name);

struct ReduceOptions {
  ReduceMethod method = ReduceMethod::gaussian;
  /// Target dimension, 1 <= m <= d; 0 selects the method's default:
  ///   gaussian, srht, countsketch: min(d, ceil(n ln(n / delta)))  (the paper's O(n log(n/delta)))
  ///   svd: rank(X) (singular values > 1e-6 sigma_max), which keeps X X^T to rounding
  ///   bss: min(d, 4 n) steps
  index_t m = 0;
  std::uint64_t seed = 0;  ///< the sketch's seed (svd and bss are deterministic and ignore it)
  double delta = 0.01;     ///< failure probability in (0, 1) of the default sketch size
};

struct Reduced {
  DenseMatrix<float> Y;  ///< n x m
  ReduceMethod method = ReduceMethod::gaussian;
  std::vector<index_t> columns;  ///< bss: the selected columns of X, ascending (Y's columns)
  std::vector<double> weights;   ///< bss: their weights s_c, Y(:, k) = sqrt(s_c) X(:, c_k)
};

/// Y (n x m) with Y Y^T ~ X X^T, for X (n x d) row-major float32.
///
/// - gaussian / srht / countsketch: Y^T = S X^T with S = sketch_rows's m x d matrix for
///   (kind, seed, d, m), i.e. Y = X S^T and E[Y Y^T] = X X^T. With m = O(n log(n/delta)) S is a
///   subspace embedding of the row space of X with probability 1 - delta (countsketch needs
///   O(n^2) for the worst case; it is cheapest), so |<y_i,y_j> - <x_i,x_j>| <= eps ||x_i|| ||x_j||
///   and the softmax Gram error is O(r) when |<x_i,x_j>| < r for all i, j.
///   Time O(n d m) (gaussian), O(n d log d) (srht), O(n d) (countsketch); memory O(n d).
/// - svd: X = U Sigma V^T in float64 (LAPACK dgesvd on the n x d matrix), Y = U_m Sigma_m.
///   Y Y^T = X X^T up to rounding for m >= rank(X); m < rank keeps the top m directions (the best
///   rank-m approximation of X X^T). Y has min(m, n, d) columns. Time O(n^2 d), memory O(n d).
/// - bss: deterministic Batson-Spielman-Srivastava sparsification of X X^T = sum_c x^(c) x^(c)^T
///   over the columns x^(c) of X. With r = rank(X) (in whose range the algorithm works, after
///   whitening by (X X^T)^+1/2) and kappa = m / r > 1, m barrier steps (each adds t v_c v_c^T for
///   the column c of largest gap L(v_c) - U(v_c) between the lower and upper barrier potentials,
///   with 1/t = (U + L) / 2) give l I <= A <= u I with u / l = (sqrt(kappa) + 1)^2 /
///   (sqrt(kappa) - 1)^2 ("Twice-Ramanujan sparsifiers", Theorem 3.1). The weights are then
///   scaled by 2 / (lambda_min(A) + lambda_max(A)), so that
///       (1 - eps) X X^T <= Y Y^T <= (1 + eps) X X^T,  eps = 2 sqrt(kappa) / (kappa + 1)
///   (in the Loewner order, on the range of X), with at most m distinct columns; eps = 0.8 for the
///   default m = 4 n on full-rank X. m = d takes every column with weight 1 (exact, eps = 0).
///   Requires m > rank(X) when m < d. Time O(m r^2 d + m r^3), memory O(r d).
///
/// Deterministic: Y is a pure function of (X, options), the same for any thread count.
/// Throws Error(invalid_argument) naming the field: "x: ..." (empty or non-finite X),
/// "m: expected 1 <= m <= d = 512, got 600" (0 means the default), "delta: ..." (not in (0, 1)).
Reduced reduce_dimension(ConstMatrix X, const ReduceOptions& options = {});

/// err(X, Y) = || D(Y)^-1 exp(Y Y^T) - D(X)^-1 exp(X X^T) ||_max with D(Z) = diag(exp(Z Z^T) 1):
/// the largest entrywise difference of the row-normalised softmax Gram matrices. X is n x d and
/// Y n x m (float32, any d and m). Computed in float64 in blocks of 64 rows, each row's
/// exponentials with the row maximum subtracted: O(n^2 (d + m)) time, O(64 (n + d + m)) memory
/// per thread (no n x n matrix). Deterministic. Throws Error(invalid_argument) "x: ..." / "y: ..."
/// for empty or non-finite input or a different number of rows.
double softmax_gram_error(ConstMatrix X, ConstMatrix Y);

}  // namespace levattn
