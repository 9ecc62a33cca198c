// l_p Lewis weights by a damped fixed-point iteration in matrix space, and the sensitivity
// bounds built on them (docs/design.md).
#include "levattn/lewis_weights.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <sstream>

#include "detail/blas.hpp"
#include "detail/gram.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"

namespace levattn {
namespace {

constexpr index_t kRows = 1024;     // rows per block in the passes over K
constexpr index_t kPartials = 16;   // fixed partial sums: results independent of thread count

// Symmetric eigendecomposition of the r x r matrix A (row-major): ascending eigenvalues, and A is
// overwritten by the eigenvectors (columns).
std::vector<double> sym_eig(std::vector<double>& A, index_t r) {
  std::vector<double> w(static_cast<std::size_t>(r));
  lapack_int info = 0;
  detail::with_serial_blas([&] {
    info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'U', static_cast<lapack_int>(r), A.data(),
                          static_cast<lapack_int>(r), w.data());
  });
  if (info != 0)
    throw Error(ErrorKind::internal, "lewis_weights: LAPACKE_dsyevd failed with info " + std::to_string(info));
  return w;
}

// out (r x r) = sum_i c_i z_i z_i^T over the rows of Z (n x r), in a fixed order of partial sums.
std::vector<double> weighted_gram(const std::vector<double>& Z, index_t n, index_t r,
                                  const std::vector<double>& c) {
  const index_t blocks = (n + kRows - 1) / kRows;
  const index_t partials = std::min(kPartials, blocks);
  std::vector<double> part(static_cast<std::size_t>(partials * r * r), 0.0);
#pragma omp parallel if (partials > 1)
  {
    std::vector<double> buf(static_cast<std::size_t>(kRows * r));
#pragma omp for schedule(dynamic, 1)
    for (index_t p = 0; p < partials; ++p)
      for (index_t b = p; b < blocks; b += partials) {
        const index_t i0 = b * kRows, rows = std::min(kRows, n - i0);
        for (index_t i = 0; i < rows; ++i) {
          const double s = std::sqrt(c[i0 + i]);
          for (index_t j = 0; j < r; ++j) buf[i * r + j] = s * Z[(i0 + i) * r + j];
        }
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, detail::bi(r), detail::bi(rows), 1.0,
                    buf.data(), detail::bi(r), 1.0, part.data() + p * r * r, detail::bi(r));
      }
  }
  return detail::sum_partial_grams(part.data(), partials, r);
}

// Z = A F for A (n x r) and F (r x r), and q_i = ||z_i||^2.
void project(const std::vector<double>& A, index_t n, index_t r, const std::vector<double>& F,
             std::vector<double>& Z, std::vector<double>& q) {
  const index_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel for schedule(static) if (blocks > 1)
  for (index_t b = 0; b < blocks; ++b) {
    const index_t i0 = b * kRows, rows = std::min(kRows, n - i0);
    detail::dgemm_ab(rows, r, r, 1.0, A.data() + i0 * r, r, F.data(), r, 0.0, Z.data() + i0 * r, r);
    for (index_t i = i0; i < i0 + rows; ++i) {
      double s = 0.0;
      for (index_t j = 0; j < r; ++j) s += Z[i * r + j] * Z[i * r + j];
      q[i] = s;
    }
  }
}

void check(ConstMatrix K, const LewisOptions& o) {
  detail::require_finite_matrix(K, "keys");
  std::ostringstream os;
  // Above p = 64 the weights' powers under- and overflow float64 and the contraction rate
  // (p - 2) / (p + 2) approaches 1.
  if (!(o.p > 0.0 && o.p <= 64.0)) {
    os << "p: expected an exponent in (0, 64], got " << o.p;
    detail::invalid(os.str());
  }
  if (o.max_iterations < 1) detail::invalid("max_iterations: expected an integer >= 1");
  if (!(o.tolerance > 0.0)) detail::invalid("tolerance: expected a number > 0");
}

}  // namespace

LewisWeights lewis_weights(ConstMatrix K, const LewisOptions& o) {
  check(K, o);
  const index_t n = K.rows, d = K.cols;
  LeverageOptions lo;
  lo.rank_rtol = o.rank_rtol;
  const KeyGram g = key_gram(K, lo);
  LewisWeights out;
  out.p = o.p;
  out.rank = g.rank;
  out.weights.assign(static_cast<std::size_t>(n), 0.0);
  const index_t r = g.rank;
  if (r == 0) {
    out.converged = true;
    return out;
  }

  // Coordinates of the numerical range in which K^T K = I: A = K V_r Lambda_r^-1/2 (n x r).
  std::vector<double> V = g.gram;
  const std::vector<double> lam = sym_eig(V, d);
  std::vector<double> basis(static_cast<std::size_t>(d * r));
  for (index_t c = 0; c < r; ++c) {
    const index_t e = d - 1 - c;
    for (index_t i = 0; i < d; ++i) basis[i * r + c] = V[i * d + e] / std::sqrt(lam[e]);
  }
  std::vector<double> A(static_cast<std::size_t>(n * r));
  {
    const index_t blocks = (n + kRows - 1) / kRows;
#pragma omp parallel if (blocks > 1)
    {
      std::vector<double> k64(static_cast<std::size_t>(kRows * d));
#pragma omp for schedule(static)
      for (index_t b = 0; b < blocks; ++b) {
        const index_t i0 = b * kRows, rows = std::min(kRows, n - i0);
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < d; ++j) k64[i * d + j] = K(i0 + i, j);
        detail::dgemm_ab(rows, r, d, 1.0, k64.data(), d, basis.data(), r, 0.0, A.data() + i0 * r, r);
      }
    }
  }

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
    const std::vector<double> theta = sym_eig(T, r);
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
    detail::with_serial_blas([&] { detail::dgemm_ab(r, r, r, 1.0, F.data(), r, T.data(), r, 0.0, Fn.data(), r); });
    F.swap(Fn);
  }
  for (index_t i = 0; i < n; ++i) out.weights[i] = std::min(std::pow(q[i], half), 1.0);

  // Residual from scratch: G = A^T W^(1-2/p) A (weights c_i = w_i^(1-2/p) = q_i^(p/2-1)),
  // q'_i = a_i^T G^-1 a_i by Cholesky, w'_i = q'_i^(p/2).
  for (index_t i = 0; i < n; ++i)
    c[i] = out.weights[i] > 0.0 ? std::pow(out.weights[i], 1.0 - 2.0 / o.p) : 0.0;
  std::vector<double> G = weighted_gram(A, n, r, c);
  lapack_int info = 0;
  detail::with_serial_blas([&] {
    info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'L', static_cast<lapack_int>(r), G.data(), static_cast<lapack_int>(r));
    if (info == 0)
      info = LAPACKE_dtrtri(LAPACK_ROW_MAJOR, 'L', 'N', static_cast<lapack_int>(r), G.data(), static_cast<lapack_int>(r));
  });
  if (info != 0) {
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
  const double factor = w.p > 2.0 ? std::pow(static_cast<double>(std::max<index_t>(w.rank, 1)), w.p / 2.0 - 1.0) : 1.0;
  s.scores.resize(w.weights.size());
  for (std::size_t j = 0; j < w.weights.size(); ++j) s.scores[j] = std::min(1.0, factor * w.weights[j]);
  return s;
}

LeverageScores sensitivity_bounds(ConstMatrix K, double p, const LeverageOptions& options) {
  if (p == 2.0) return leverage_scores(K, options);
  if (options.method == ScoreMethod::sketch)
    detail::invalid("method sketch: supported for p = 2 (leverage scores) only");
  LewisOptions lo;
  lo.p = p;
  lo.rank_rtol = options.rank_rtol;
  // Iterations to contract by 1e-12 at rate |p - 2| / (p + 2), with room to spare.
  lo.max_iterations = std::max<index_t>(
      lo.max_iterations,
      static_cast<index_t>(std::ceil(4.0 * 28.0 / std::max(1e-3, -std::log(std::fabs(p - 2.0) / (p + 2.0))))));
  const LewisWeights w = lewis_weights(K, lo);
  if (!w.converged) {
    std::ostringstream os;
    os << "lewis_weights: no convergence for p = " << p << " after " << w.iterations
       << " iterations (residual " << w.residual << ")";
    throw Error(ErrorKind::internal, os.str());
  }
  return sensitivity_bounds(w);
}

}  // namespace levattn
