// l_p Lewis weights by a damped fixed-point iteration in matrix space, and the sensitivity
// bounds built on them (docs/design.md).
#include "levattn/lewis_weights.hpp"

#include <algorithm>
#include <cmath>
#include <memory>

#include "detail/blas.hpp"
#include "detail/gram.hpp"
#include "detail/lapack.hpp"
#include "leverage.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"

namespace levattn {
namespace {

constexpr index_t kRows = 1024;     // rows per block in the passes over K

// out (r x r) = sum_i c_i z_i z_i^T over the rows of Z (n x r), by the fixed-order accumulator.
std::vector<double> weighted_gram(const std::vector<double>& Z, index_t n, index_t r,
                                  const std::vector<double>& c) {
  const index_t blocks = (n + kRows - 1) / kRows;
  return detail::fixed_order_gram(blocks, std::min(kRows, n), r, [&](index_t b, double* buf) {
    const index_t i0 = b * kRows, rows = std::min(kRows, n - i0);
    for (index_t i = 0; i < rows; ++i) {
      const double s = std::sqrt(c[i0 + i]);
      for (index_t j = 0; j < r; ++j) buf[i * r + j] = s * Z[(i0 + i) * r + j];
    }
    return rows;
  });
}

// Z = A F for A (n x r) and F (r x r), and q_i = ||z_i||^2.
void project(const std::vector<double>& A, index_t n, index_t r, const std::vector<double>& F,
             std::vector<double>& Z, std::vector<double>& q) {
  const index_t blocks = (n + kRows - 1) / kRows;
  detail::parallel_tasks(
      blocks, 2.0 * static_cast<double>(n) * static_cast<double>(r * r), [] { return 0; },
      [&](index_t b, int&) {
        const index_t i0 = b * kRows, rows = std::min(kRows, n - i0);
        detail::dgemm_ab(rows, r, r, 1.0, A.data() + i0 * r, r, F.data(), r, 0.0, Z.data() + i0 * r, r);
        for (index_t i = i0; i < i0 + rows; ++i) {
          double s = 0.0;
          for (index_t j = 0; j < r; ++j) s += Z[i * r + j] * Z[i * r + j];
          q[i] = s;
        }
      });
}

// A = K B (n x r) in float64 for the d x r basis B.
std::vector<double> coordinates(ConstMatrix K, const std::vector<double>& B, index_t r) {
  const index_t n = K.rows, d = K.cols;
  std::vector<double> A(static_cast<std::size_t>(n * r));
  const index_t blocks = (n + kRows - 1) / kRows;
  detail::parallel_tasks(
      blocks, 2.0 * static_cast<double>(n) * static_cast<double>(d * r),
      [&] { return std::vector<double>(static_cast<std::size_t>(std::min(kRows, n) * d)); },
      [&](index_t b, std::vector<double>& k64) {
        const index_t i0 = b * kRows, rows = std::min(kRows, n - i0);
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < d; ++j) k64[i * d + j] = K(i0 + i, j);
        detail::dgemm_ab(rows, r, d, 1.0, k64.data(), d, B.data(), r, 0.0, A.data() + i0 * r, r);
      });
  return A;
}

void check(ConstMatrix K, const LewisOptions& o) {
  detail::require_finite_matrix(K, "keys");
  // Above p = 64 the weights' powers under- and overflow float64 and the contraction rate
  // (p - 2) / (p + 2) approaches 1.
  LEVATTN_REQUIRE(o.p > 0.0 && o.p <= 64.0, "p", "expected an exponent in (0, 64], got ", o.p);
  LEVATTN_REQUIRE(o.max_iterations >= 1, "max_iterations", "expected an integer >= 1");
  LEVATTN_REQUIRE(o.tolerance > 0.0, "tolerance", "expected a number > 0");
}

}  // namespace

LewisWeights lewis_weights(ConstMatrix K, const LewisOptions& o) {
  check(K, o);
  const index_t n = K.rows;
  LeverageOptions lo;
  lo.rank_rtol = o.rank_rtol;
  // The Gram's own eigenvector factor B = V_r Lambda_r^-1/2: coordinates A = K B of the
  // numerical range in which K^T K = I.
  const KeyGram g = detail::key_gram(K, lo, /*allow_triangular=*/false);
  LewisWeights out;
  out.p = o.p;
  out.rank = g.rank;
  out.weights.assign(static_cast<std::size_t>(n), 0.0);
  const index_t r = g.rank;
  if (r == 0) {
    out.converged = true;
    return out;
  }
  const std::vector<double> A = coordinates(K, g.factor, r);

  // M = F F^T; F = I is the p = 2 solution. See the header for the step and its contraction.
  std::vector<double> F(static_cast<std::size_t>(r * r), 0.0);
  for (index_t i = 0; i < r; ++i) F[i * r + i] = 1.0;
  std::vector<double> Z(static_cast<std::size_t>(n * r)), q(static_cast<std::size_t>(n)),
      c(static_cast<std::size_t>(n));
  const double half = o.p / 2.0;
  double eta = 4.0 / (o.p + 2.0), last = INFINITY;
  int growing = 0;
  for (index_t it = 0;; ++it) {
    project(A, n, r, F, Z, q);
    for (index_t i = 0; i < n; ++i) c[i] = q[i] > 0.0 ? std::pow(q[i], half - 1.0) : 0.0;
    std::vector<double> T = weighted_gram(Z, n, r, c);  // F^T C F
    // At small p the weights' powers q^(p/2 - 1) overflow float64: no step can be taken.
    if (!std::all_of(T.begin(), T.end(), [](double t) { return std::isfinite(t); })) break;
    const std::vector<double> theta = detail::symmetric_eigen(T, r, "lewis_weights");
    double measure = 0.0;
    for (double t : theta) measure = std::max(measure, t > 0.0 ? std::fabs(std::log(t)) : INFINITY);
    out.iterations = it;
    if (measure <= o.tolerance) {
      out.converged = true;
      break;
    }
    if (it >= o.max_iterations || !std::isfinite(measure)) break;
    growing = measure > last ? growing + 1 : 0;
    if (growing >= 3) {  // safeguard: the linearisation's step is too long here
      eta *= 0.5;
      growing = 0;
    }
    last = measure;
    // F <- F U Theta^(-eta/2)
    std::vector<double> Fn(static_cast<std::size_t>(r * r));
    for (index_t k = 0; k < r; ++k) {
      const double s = std::pow(theta[k], -eta / 2.0);
      for (index_t i = 0; i < r; ++i) T[i * r + k] *= s;
    }
    {
      const detail::SerialScope serial;  // r x r: not worth a team
      detail::dgemm_ab(r, r, r, 1.0, F.data(), r, T.data(), r, 0.0, Fn.data(), r);
    }
    F.swap(Fn);
  }
  for (index_t i = 0; i < n; ++i) out.weights[i] = std::min(std::pow(q[i], half), 1.0);

  // Residual from scratch: G = A^T W^(1-2/p) A (weights c_i = w_i^(1-2/p) = q_i^(p/2-1)),
  // q'_i = a_i^T G^-1 a_i by Cholesky, w'_i = q'_i^(p/2).
  for (index_t i = 0; i < n; ++i)
    c[i] = out.weights[i] > 0.0 ? std::pow(out.weights[i], 1.0 - 2.0 / o.p) : 0.0;
  std::vector<double> G = weighted_gram(A, n, r, c);
  if (!detail::inverse_cholesky(G, r)) {
    out.residual = INFINITY;
    out.converged = false;
    return out;
  }
  std::vector<double> Linv_t(static_cast<std::size_t>(r * r), 0.0);  // (L^-1)^T
  for (index_t i = 0; i < r; ++i)
    for (index_t j = 0; j <= i; ++j) Linv_t[j * r + i] = G[i * r + j];
  project(A, n, r, Linv_t, Z, q);
  double res = 0.0;
  for (index_t i = 0; i < n; ++i) res = std::max(res, std::fabs(std::pow(q[i], half) - out.weights[i]));
  out.residual = res;
  return out;
}

LeverageScores sensitivity_bounds(const LewisWeights& w) {
  LeverageScores s;
  s.rank = w.rank;
  s.sum_bound = std::pow(static_cast<double>(w.rank), std::max(1.0, w.p / 2.0));
  const double factor = w.p > 2.0 ? std::pow(static_cast<double>(std::max<index_t>(w.rank, 1)), w.p / 2.0 - 1.0) : 1.0;
  s.scores.resize(w.weights.size());
  for (std::size_t j = 0; j < w.weights.size(); ++j) s.scores[j] = std::min(1.0, factor * w.weights[j]);
  return s;
}

LeverageScores sensitivity_bounds(ConstMatrix K, double p, const LeverageOptions& options) {
  if (p == 2.0) return leverage_scores(K, options);
  LEVATTN_REQUIRE(options.method != ScoreMethod::sketch, "method sketch",
                  "supported for p = 2 (leverage scores) only");
  LEVATTN_REQUIRE(options.ridge == 0.0, "ridge",
                  "applies to leverage scores (p = 2) only; the |x|^p sensitivity bounds take none");
  // Below p = 0.01 the iteration needs over 10^4 steps and its powers q^(p/2 - 1) leave float64.
  LEVATTN_REQUIRE(p >= 0.01, "p", "the |x|^p sensitivity bounds (Lewis weights) take p >= 0.01, got ", p);
  LewisOptions lo;
  lo.p = p;
  lo.rank_rtol = options.rank_rtol;
  // Iterations to contract by 1e-12 at rate |p - 2| / (p + 2), with room to spare.
  lo.max_iterations = std::max<index_t>(
      lo.max_iterations,
      static_cast<index_t>(std::ceil(4.0 * 28.0 / std::max(1e-3, -std::log(std::fabs(p - 2.0) / (p + 2.0))))));
  const LewisWeights w = lewis_weights(K, lo);
  if (!w.converged)
    detail::fail(ErrorKind::internal, "lewis_weights", "no convergence for p = ", p, " after ", w.iterations,
                 " iterations (residual ", w.residual, ")");
  return sensitivity_bounds(w);
}

}  // namespace levattn
