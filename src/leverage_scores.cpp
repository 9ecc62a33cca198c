// Exact leverage scores: Gram matrix in float64, symmetric eigendecomposition (rank-revealing),
// then one BLAS-3 pass for the row norms of K B (docs/design.md).
#include "levattn/leverage_scores.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>

#include "detail/blas.hpp"
#include "detail/gram.hpp"
#include "detail/lapack.hpp"
#include "detail/names.hpp"
#include "leverage.hpp"
#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "detail/validate.hpp"
#include "kernels/elementwise.hpp"

namespace levattn {

namespace {

constexpr std::pair<ScoreMethod, const char*> kMethodNames[] = {{ScoreMethod::exact, "exact"},
                                                                {ScoreMethod::sketch, "sketch"}};

}  // namespace

std::string to_string(ScoreMethod method) { return detail::name_of(kMethodNames, method); }
ScoreMethod parse_score_method(const std::string& name) { return detail::parse_name(kMethodNames, name, "method"); }
namespace {

constexpr index_t kConvertRows = detail::kGramRows;  // rows converted to float64 per Gram block
constexpr index_t kScoreRows = 1024;    // rows per GEMM in the score pass
// Use the float32 score pass when its proven relative error is at most this.
constexpr double kFloat32Tolerance = 1e-4;

void check_options(const LeverageOptions& o) {
  LEVATTN_REQUIRE(o.ridge >= 0.0 && std::isfinite(o.ridge), "ridge", "expected a finite number >= 0, got ", o.ridge);
  LEVATTN_REQUIRE(o.rank_rtol >= 0.0 && o.rank_rtol < 1.0, "rank_rtol", "expected a number in [0, 1), got ",
                  o.rank_rtol);
}

// sum_c y_c^2 in float64 with 8 independent partial sums, so that the loop vectorises.
template <class T>
double squared_norm(const T* y, index_t k) {
  double lane[8] = {};
  index_t c = 0;
  for (; c + 8 <= k; c += 8)
    for (index_t l = 0; l < 8; ++l) lane[l] += static_cast<double>(y[c + l]) * y[c + l];
  double s = 0.0;
  for (; c < k; ++c) s += static_cast<double>(y[c]) * y[c];
  for (double v : lane) s += v;
  return s;
}

// gamma_k = k u / (1 - k u), the standard bound for a length-k dot product in precision u.
double gamma(index_t k, double u) { return static_cast<double>(k) * u / (1.0 - static_cast<double>(k) * u); }

// Full rank: B = L^-T with L L^T = M + ridge I (Cholesky), upper triangular, so the score pass
// is a triangular multiply (half the flops of a GEMM). False if the Cholesky breaks down.
bool triangular_factor(KeyGram& g) {
  const index_t d = g.d;
  std::vector<double> L = g.gram;
  for (index_t i = 0; i < d; ++i) L[i * d + i] += g.ridge;
  if (!detail::inverse_cholesky(L, d)) return false;
  g.factor.assign(static_cast<std::size_t>(d * d), 0.0);
  for (index_t i = 0; i < d; ++i)
    for (index_t j = i; j < d; ++j) g.factor[i * d + j] = L[j * d + i];  // (L^-1)^T
  g.triangular = true;
  return true;
}

// Fast path for well-conditioned M (no ridge): B = L^-T from one Cholesky, no eigensolver. With
// t = min(trace(M), ||M||_inf) >= lambda_max (both bound the largest eigenvalue of a positive
// semi-definite M; the row-sum norm is nearly tight for well-spread keys) and
// f = ||L^-1||_F^2 = trace(M^-1) = sum_i 1 / lambda_i exactly, t f bounds sum_i lambda_max / lambda_i
// and the condition number; when t f < 1 / rank_rtol^2 every eigenvalue exceeds
// rank_rtol^2 lambda_max, so M has full numerical rank. False otherwise.
bool cholesky_factor(KeyGram& g, double rank_rtol) {
  const index_t d = g.d;
  std::vector<double> L = g.gram;
  if (!detail::inverse_cholesky(L, d)) return false;
  double trace = 0.0, row_sum = 0.0, frob = 0.0;
  for (index_t i = 0; i < d; ++i) {
    trace += g.gram[i * d + i];
    double r = 0.0;
    for (index_t j = 0; j < d; ++j) r += std::fabs(g.gram[i * d + j]);
    row_sum = std::max(row_sum, r);
    for (index_t j = 0; j <= i; ++j) frob += L[i * d + j] * L[i * d + j];
  }
  const double bound = std::min(trace, row_sum) * frob;
  if (!(std::isfinite(bound) && bound * rank_rtol * rank_rtol < 1.0)) return false;
  g.factor.assign(static_cast<std::size_t>(d * d), 0.0);
  for (index_t i = 0; i < d; ++i)
    for (index_t j = i; j < d; ++j) g.factor[i * d + j] = L[j * d + i];  // (L^-1)^T
  g.triangular = true;
  g.rank = d;
  g.condition_sum = g.condition = bound;
  return true;
}

// The eigendecomposition path: numerical rank (eigenvalues above rank_rtol^2 lambda_max), exact
// condition figures, and B = V_r Lambda_r^-1/2 (all d directions with a ridge, where M + lambda I
// is invertible), or the Cholesky factor of M + ridge I when allowed and of full rank.
void eigen_factor(KeyGram& g, double rank_rtol, bool allow_triangular) {
  const index_t d = g.d;
  std::vector<double> vecs = g.gram;
  const std::vector<double> w = detail::symmetric_eigen(vecs, d, "leverage_scores");
  const double lmax = std::max(w[d - 1], 0.0);
  const double cut = rank_rtol * rank_rtol * lmax;
  index_t rank = 0;
  for (index_t i = 0; i < d; ++i) rank += (w[i] > cut && lmax > 0.0) ? 1 : 0;
  g.rank = rank;
  const index_t kept = g.ridge > 0.0 ? d : rank;
  const auto lambda = [&](index_t c) { return std::max(w[d - 1 - c], 0.0) + g.ridge; };  // descending
  g.condition_sum = 0.0;
  for (index_t c = 0; c < kept; ++c) g.condition_sum += lambda(0) / lambda(c);
  g.condition = kept > 0 ? lambda(0) / lambda(kept - 1) : 1.0;
  if (allow_triangular && kept == d && triangular_factor(g)) return;
  g.triangular = false;
  g.factor.assign(static_cast<std::size_t>(d * kept), 0.0);
  for (index_t c = 0; c < kept; ++c) {
    const index_t e = d - 1 - c;
    const double sc = 1.0 / std::sqrt(lambda(c));
    for (index_t i = 0; i < d; ++i) g.factor[i * kept + c] = vecs[i * d + e] * sc;
  }
}

// From g.gram (M) and g.ridge: numerical rank and the factor B with (M + ridge I)^+ = B B^T.
void factor_gram(KeyGram& g, double rank_rtol, bool allow_triangular) {
  if (allow_triangular && g.ridge == 0.0 && cholesky_factor(g, rank_rtol)) return;
  eigen_factor(g, rank_rtol, allow_triangular);
}

// Per-thread buffers of the score pass.
struct ScoreWorkspace {
  std::vector<float> y32;
  std::vector<double> k64, y64;
};

// tau_j = ||B^T k_j||^2 for rows r0 .. r0 + rows - 1, in float32 (B32 = the factor in float32).
void score_rows32(ConstMatrix K, const KeyGram& g, const std::vector<float>& B32, index_t r0,
                  index_t rows, ScoreWorkspace& ws, double* scores) {
  const index_t d = K.cols, kept = static_cast<index_t>(B32.size()) / d;
  ws.y32.resize(static_cast<std::size_t>(rows * kept));
  if (kept <= kernels::kSmallGram) {
    // Few columns: the register-blocked product of the attention kernels beats a BLAS call's
    // set-up (the triangle's zeros are multiplied too; the rounding bound is the same).
    kernels::active_row_ops().narrow_logits(rows, kept, d, 1.0f, K.row(r0), K.ld, B32.data(), ws.y32.data(), kept);
  } else if (g.triangular) {
    for (index_t i = 0; i < rows; ++i) std::copy_n(K.row(r0 + i), d, ws.y32.data() + i * d);
    cblas_strmm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, detail::bi(rows),
                detail::bi(d), 1.0f, B32.data(), detail::bi(d), ws.y32.data(), detail::bi(d));
  } else {
    detail::gemm_ab(rows, kept, d, 1.0f, K.row(r0), K.ld, B32.data(), kept, 0.0f, ws.y32.data(), kept);
  }
  for (index_t i = 0; i < rows; ++i) scores[i] = std::min(squared_norm(ws.y32.data() + i * kept, kept), 1.0);
}

// The same in float64, for keys whose conditioning needs it.
void score_rows64(ConstMatrix K, const KeyGram& g, index_t r0, index_t rows, ScoreWorkspace& ws,
                  double* scores) {
  const index_t d = K.cols, kept = static_cast<index_t>(g.factor.size()) / d;
  ws.k64.resize(static_cast<std::size_t>(rows * d));
  ws.y64.resize(static_cast<std::size_t>(rows * kept));
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < d; ++j) ws.k64[i * d + j] = K(r0 + i, j);
  if (g.triangular) {
    std::copy_n(ws.k64.data(), rows * d, ws.y64.data());
    cblas_dtrmm(CblasRowMajor, CblasRight, CblasUpper, CblasNoTrans, CblasNonUnit, detail::bi(rows),
                detail::bi(d), 1.0, g.factor.data(), detail::bi(d), ws.y64.data(), detail::bi(d));
  } else {
    detail::dgemm_ab(rows, kept, d, 1.0, ws.k64.data(), d, g.factor.data(), kept, 0.0, ws.y64.data(), kept);
  }
  for (index_t i = 0; i < rows; ++i) scores[i] = std::min(squared_norm(ws.y64.data() + i * kept, kept), 1.0);
}

}  // namespace

void detail::check_leverage_options(const LeverageOptions& o) { check_options(o); }

namespace detail {

KeyGram gram_factor(std::vector<double> gram, index_t d, const LeverageOptions& options) {
  KeyGram g;
  g.d = d;
  g.ridge = options.ridge;
  g.gram = std::move(gram);
  factor_gram(g, options.rank_rtol, /*allow_triangular=*/true);
  return g;
}

KeyGram key_gram(ConstMatrix K, const LeverageOptions& options, bool allow_triangular) {
  if (K.rows <= 0 || K.cols <= 0) detail::require_finite_matrix(K, "keys");  // names the shape
  check_options(options);
  const index_t n = K.rows, d = K.cols;

  // M = K^T K in float64 by the fixed-order accumulator; K is converted (and checked for
  // finiteness) one block at a time, so it is read once.
  const index_t blocks = (n + kConvertRows - 1) / kConvertRows;
  std::atomic<bool> finite{true};
  std::vector<double> gram = detail::fixed_order_gram(
      blocks, std::min(kConvertRows, n), d, [&](index_t c, double* buf) {
        const index_t r0 = c * kConvertRows, rows = std::min(kConvertRows, n - r0);
        // Contiguous rows convert as one run (short rows make per-row loops slow).
        const index_t run = K.ld == d ? rows * d : d, runs = K.ld == d ? 1 : rows;
        const kernels::RowOps& ops = kernels::active_row_ops();
        bool ok = true;
        for (index_t i = 0; i < runs; ++i) ok &= ops.widen(K.row(r0 + i), run, buf + i * d);
        if (!ok) finite.store(false, std::memory_order_relaxed);
        return rows;
      });
  if (!finite) detail::require_finite_matrix(K, "keys");  // throws, naming the entry

  KeyGram g;
  g.d = d;
  g.ridge = options.ridge;
  g.gram = std::move(gram);
  factor_gram(g, options.rank_rtol, allow_triangular);
  return g;
}

}  // namespace detail

KeyGram key_gram(ConstMatrix K, const LeverageOptions& options) {
  return detail::key_gram(K, options, /*allow_triangular=*/true);
}

namespace detail {

LeverageScores scores_unchecked(ConstMatrix K, const KeyGram& g, ScorePass pass) {
  const index_t n = K.rows, d = K.cols;
  const index_t kept = d > 0 ? static_cast<index_t>(g.factor.size()) / d : 0;
  LeverageScores out;
  out.rank = g.rank;
  out.sum_bound = static_cast<double>(g.rank);
  out.scores.assign(static_cast<std::size_t>(n), 0.0);
  if (kept == 0) return out;  // K == 0: every score is 0
  if (pass.rows_of_gram && g.ridge == 0.0 && g.rank <= n) {
    // Full row rank over the nonzero rows (a zero row scores 0 and leaves the others alone, as
    // masked keys are passed): K K^+ is the identity there, so those scores are exactly 1;
    // rounding would only blur the ties, and break them differently with and without the zero
    // rows.
    std::vector<char> nonzero(static_cast<std::size_t>(n), 0);
    index_t rows = 0;
    for (index_t j = 0; j < n; ++j) {
      const float* k = K.row(j);
      nonzero[j] = std::any_of(k, k + d, [](float x) { return x != 0.0f; }) ? 1 : 0;
      rows += nonzero[j];
    }
    if (rows == g.rank) {
      for (index_t j = 0; j < n; ++j) out.scores[j] = nonzero[j] ? 1.0 : 0.0;
      return out;
    }
  }

  // Rounding bound of y_j = B^T k_j (see header): ||dy|| <= (gamma_d + u) ||k_j|| ||B||_F and
  // ||y_j|| >= ||k_j|| / sqrt(lambda_max), so the relative error of tau_j = ||y_j||^2 is at most
  // 2 delta + delta^2 with delta = (gamma_d + u) sqrt(sum_i lambda_max / lambda_i).
  // (condition figures of KeyGram: exact, or upper bounds on the Cholesky fast path).
  const double cond_sum = g.condition_sum, kappa = g.condition;
  // Plus the factorisation's own error: dsyevd / Cholesky perturb M by about d u64 lambda_max,
  // a relative error of d u64 kappa(M) in every score (generous constant 10).
  const double factorisation = 10.0 * static_cast<double>(d) * std::numeric_limits<double>::epsilon() * kappa;
  const auto bound = [&](double u) {
    const double delta = (gamma(d, u) + u) * std::sqrt(cond_sum);
    return 2.0 * delta + delta * delta + factorisation;
  };
  const double bound32 = bound(std::numeric_limits<float>::epsilon() / 2);
  const bool use_float32 = pass.approximate || bound32 <= kFloat32Tolerance;
  const double bnd = use_float32 ? bound32 : bound(std::numeric_limits<double>::epsilon() / 2);
  // |tau~ - tau| <= b tau gives tau / (1 + g) <= tau~ <= tau (1 + g) with g = b / (1 - b).
  out.rel_error_bound = bnd < 1.0 ? bnd / (1.0 - bnd) : INFINITY;

  std::vector<float> B32;
  if (use_float32) B32.assign(g.factor.begin(), g.factor.end());
  const index_t blocks = (n + kScoreRows - 1) / kScoreRows;
  parallel_tasks(
      blocks, 2.0 * static_cast<double>(n) * static_cast<double>(d * kept),
      [] { return ScoreWorkspace{}; },
      [&](index_t b, ScoreWorkspace& ws) {
        const index_t r0 = b * kScoreRows, rows = std::min(kScoreRows, n - r0);
        if (use_float32) score_rows32(K, g, B32, r0, rows, ws, out.scores.data() + r0);
        else score_rows64(K, g, r0, rows, ws, out.scores.data() + r0);
      });
  return out;
}

}  // namespace detail

LeverageScores leverage_scores(ConstMatrix K, const KeyGram& g) {
  detail::require_finite_matrix(K, "keys");
  LEVATTN_REQUIRE(K.cols == g.d, "keys", "expected ", g.d, " columns (the Gram's dimension), got ", K.cols);
  return detail::scores_unchecked(K, g, {.rows_of_gram = false});
}

namespace {

// Stated accuracy of sketched scores (see the header): embedding distortion e of an s-row sketch
// of a rank-r range, JL error e_J of t columns over n rows; returns gamma.
double sketch_gamma(index_t r, index_t s, index_t n, index_t t, double delta) {
  const double e = (std::sqrt(static_cast<double>(r)) + std::sqrt(2.0 * std::log(2.0 / delta))) /
                   std::sqrt(static_cast<double>(s));
  const double ej = t > 0 ? std::sqrt(8.0 * std::log(2.0 * static_cast<double>(n) / delta) /
                                      static_cast<double>(t))
                          : 0.0;
  if (e >= 1.0 || ej >= 1.0) return INFINITY;
  const double upper = (1.0 + ej) / ((1.0 - e) * (1.0 - e));
  const double lower = (1.0 - ej) / ((1.0 + e) * (1.0 + e));
  return std::max(upper - 1.0, 1.0 / lower - 1.0);
}

void check_sketch_options(const LeverageOptions& o) {
  check_options(o);  // ridge and rank_rtol
  LEVATTN_REQUIRE(o.ridge == 0.0, "ridge", "applies to the exact method only");
  detail::require_open_unit(o.gamma, "gamma");
  detail::require_open_unit(o.delta, "delta");
  LEVATTN_REQUIRE(o.sketch_size >= 0 && o.jl_columns >= 0, "sketch_size, jl_columns",
                  "expected integers >= 0 (0: automatic / none)");
}

LeverageScores sketched_scores(ConstMatrix K, const LeverageOptions& o) {
  check_sketch_options(o);
  if (K.rows <= 0 || K.cols <= 0) detail::require_finite_matrix(K, "keys");
  const index_t n = K.rows, d = K.cols;
  const bool jl = o.jl_columns > 0 && o.jl_columns < d;
  // With JL the accuracy budget is split evenly between the two factors.
  const double target = jl ? std::sqrt(1.0 + o.gamma) - 1.0 : o.gamma;
  index_t s = o.sketch_size;
  if (s == 0) {
    // Smallest s whose embedding part meets the target: (1 - e)^-2 = 1 + target.
    const double e = 1.0 - 1.0 / std::sqrt(1.0 + target);
    const double root = std::sqrt(static_cast<double>(d)) + std::sqrt(2.0 * std::log(2.0 / o.delta));
    s = detail::to_index(std::ceil(root * root / (e * e)));
  }
  // S K would have rank below d: its Gram cannot stand for K^T K
  LEVATTN_REQUIRE(s >= d, "sketch_size", "expected at least d = ", d, " rows (fewer cannot embed the range of ",
                  "keys with d columns), got ", s);
  if (s >= n) {  // the sketch would not be smaller than K
    LeverageOptions exact = o;
    exact.method = ScoreMethod::exact;
    return leverage_scores(K, exact);
  }
  // (S K)^T (S K) approximates K^T K within (1 +- e)^2 on every direction of range(K); the rest
  // is the exact path's factorisation applied to it.
  KeyGram g;
  g.d = d;
  try {
    g.gram = sketch_gram(K, s, o.sketch, o.seed);  // validates K while reading it
  } catch (const Error& e) {
    if (e.field() != "matrix") throw;
    detail::fail(e.kind(), "keys", e.detail());  // relabelled: what() "matrix: ..." becomes "keys: ..."
  }
  factor_gram(g, o.rank_rtol, /*allow_triangular=*/!jl);
  const index_t rank = g.rank;
  if (jl && o.jl_columns < rank) {
    // B G / sqrt(t) with G Gaussian (rank x t): ||k^T B G||^2 / t estimates ||k^T B||^2.
    const index_t t = o.jl_columns;
    const detail::CounterRng rng(o.seed, detail::Purpose::jl_projection);
    std::vector<double> G(static_cast<std::size_t>(rank * t));
    for (index_t i = 0; i < rank * t; ++i)
      G[i] = rng.normal(static_cast<std::uint64_t>(i)) / std::sqrt(static_cast<double>(t));
    std::vector<double> BG(static_cast<std::size_t>(d * t));
    detail::dgemm_ab(d, t, rank, 1.0, g.factor.data(), rank, G.data(), t, 0.0, BG.data(), t);
    g.factor.swap(BG);
  }
  LeverageScores out = detail::scores_unchecked(K, g, {.approximate = true});
  const index_t t = jl && o.jl_columns < rank ? o.jl_columns : 0;
  const double stated = sketch_gamma(rank, s, n, t, o.delta);
  out.rel_error_bound = (1.0 + stated) * (1.0 + out.rel_error_bound) - 1.0;  // with the rounding
  out.method = ScoreMethod::sketch;
  out.sketch_size = s;
  out.failure_probability = t > 0 ? 2.0 * o.delta : o.delta;
  return out;
}

}  // namespace

LeverageScores leverage_scores(ConstMatrix K, const LeverageOptions& options) {
  if (options.method == ScoreMethod::sketch) return sketched_scores(K, options);
  // key_gram validated K while reading it.
  return detail::scores_unchecked(K, key_gram(K, options));
}

}  // namespace levattn
