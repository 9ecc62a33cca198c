// Feature-dimension reduction X (n x d) -> Y (n x m) preserving the softmax Gram matrix:
// sketches of the feature dimension, the thin SVD, and deterministic BSS sparsification.
#include "levattn/reduce.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "detail/blas.hpp"
#include "detail/lapack.hpp"
#include "detail/names.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/sketch.hpp"

namespace levattn {
namespace {

constexpr double kRankRtol = 1e-6;       // singular values <= kRankRtol * sigma_max count as 0
constexpr index_t kErrorRows = 64;       // rows per block of softmax_gram_error
constexpr index_t kBssChunk = 512;       // candidate columns per task of a BSS step

// X as float64, row-major n x d.
std::vector<double> to_double(ConstMatrix X) {
  std::vector<double> a(static_cast<std::size_t>(X.rows * X.cols));
#pragma omp parallel for schedule(static) if (X.rows * X.cols > (1 << 16))
  for (index_t i = 0; i < X.rows; ++i) {
    const float* x = X.row(i);
    double* y = a.data() + i * X.cols;
    for (index_t j = 0; j < X.cols; ++j) y[j] = x[j];
  }
  return a;
}

index_t default_m(ReduceMethod method, index_t n, index_t d, double delta) {
  switch (method) {
    case ReduceMethod::svd: return 0;  // rank(X), known after the SVD
    case ReduceMethod::bss: return std::min(d, 4 * n);
    default: {
      const double nd = static_cast<double>(n);
      const double m = std::ceil(nd * std::log(nd / delta));
      return std::max<index_t>(1, std::min(d, static_cast<index_t>(std::min(m, 9e18))));
    }
  }
}

// ---------------------------------------------------------------------------------------------

Reduced reduce_sketch(ConstMatrix X, index_t m, SketchKind kind, std::uint64_t seed) {
  const index_t n = X.rows, d = X.cols;
  // Y^T = S X^T: sketch the d rows of X^T (d x n).
  std::vector<double> At(static_cast<std::size_t>(d * n));
#pragma omp parallel for schedule(static) if (n * d > (1 << 16))
  for (index_t i = 0; i < n; ++i) {
    const float* x = X.row(i);
    for (index_t j = 0; j < d; ++j) At[j * n + i] = x[j];
  }
  const DenseMatrix<double> Yt = sketch_rows(At.data(), d, n, n, m, kind, seed);  // m x n
  Reduced r;
  r.Y = DenseMatrix<float>(n, m);
  for (index_t k = 0; k < m; ++k)
    for (index_t i = 0; i < n; ++i) r.Y(i, k) = static_cast<float>(Yt(k, i));
  return r;
}

Reduced reduce_svd(ConstMatrix X, index_t m) {
  const index_t n = X.rows, d = X.cols, k = std::min(n, d);
  std::vector<double> a = to_double(X), s(static_cast<std::size_t>(k)),
                      u(static_cast<std::size_t>(n * k)), vt(1), superb(static_cast<std::size_t>(k));
  lapack_int info = 0;
  {
    const detail::SerialScope serial(!detail::worth_parallel(4.0 * static_cast<double>(n * d * k)));
    info = LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'N', detail::li(n), detail::li(d), a.data(),
                          detail::li(d), s.data(), u.data(), detail::li(k), vt.data(), 1, superb.data());
  }
  if (info != 0) detail::fail(ErrorKind::internal, "reduce_dimension", "LAPACKE_dgesvd failed with info ", info);
  if (m == 0) {  // default: the numerical rank (at least one column)
    for (index_t c = 0; c < k; ++c) m += (s[0] > 0.0 && s[c] > kRankRtol * s[0]) ? 1 : 0;
    m = std::max<index_t>(m, 1);
  }
  m = std::min(m, k);
  Reduced r;
  r.Y = DenseMatrix<float>(n, m);
  for (index_t i = 0; i < n; ++i)
    for (index_t c = 0; c < m; ++c) r.Y(i, c) = static_cast<float>(u[i * k + c] * s[c]);
  return r;
}

// The whitened columns of BSS: row c of W (d x r) is w_c = Lambda_r^-1/2 V_r^T x^(c) with
// X X^T = V Lambda V^T, so that sum_c w_c w_c^T = I_r; r = rank(X).
struct Whitened {
  index_t r = 0;
  std::vector<double> W;
  std::vector<char> usable;  // w_c != 0
};

Whitened whiten_columns(ConstMatrix X) {
  const index_t n = X.rows, d = X.cols;
  const std::vector<double> xd = to_double(X);
  std::vector<double> V(static_cast<std::size_t>(n * n), 0.0);
  // Serial: OpenBLAS's threaded dsyrk / dgemm can round differently with the thread count on
  // some cores (Cooperlake's kernels), and BSS's greedy steps would turn that into other
  // columns. Both products are O(n^2 d) on the few rows of X.
  const detail::SerialScope serial;
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, detail::bi(n), detail::bi(d), 1.0, xd.data(),
              detail::bi(d), 0.0, V.data(), detail::bi(n));
  const std::vector<double> lam = detail::symmetric_eigen(V, n, "reduce_dimension (bss)");
  const double lmax = lam[n - 1];
  Whitened out;
  for (index_t i = 0; i < n; ++i) out.r += (lmax > 0.0 && lam[i] > kRankRtol * kRankRtol * lmax) ? 1 : 0;
  const index_t r = out.r;
  if (r == 0) return out;
  // B = V_r Lambda_r^-1/2 (n x r), eigenvalues descending; W = X^T B.
  std::vector<double> B(static_cast<std::size_t>(n * r));
  for (index_t c = 0; c < r; ++c) {
    const index_t e = n - 1 - c;
    const double sc = 1.0 / std::sqrt(lam[e]);
    for (index_t i = 0; i < n; ++i) B[i * r + c] = V[i * n + e] * sc;
  }
  out.W.resize(static_cast<std::size_t>(d * r));
  cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, detail::bi(d), detail::bi(r), detail::bi(n), 1.0,
              xd.data(), detail::bi(d), B.data(), detail::bi(r), 0.0, out.W.data(), detail::bi(r));
  out.usable.resize(static_cast<std::size_t>(d));
  for (index_t c = 0; c < d; ++c) {
    double s = 0.0;
    for (index_t k = 0; k < r; ++k) s += out.W[c * r + k] * out.W[c * r + k];
    out.usable[c] = s > 0.0;
  }
  return out;
}

// A candidate of one BSS step: column c with U(w_c) = su, L(w_c) = sl, gap = sl - su.
struct Candidate {
  double gap = -std::numeric_limits<double>::infinity(), su = 0.0, sl = 0.0;
  index_t c = -1;
};

// The column of largest gap L(w_c) - U(w_c) with U(v) = sum_k z_k^2 cu_k, L(v) = sum_k z_k^2 cl_k
// and z = Q^T w_c (Q: eigenvectors of A); ties to the lower index. Chunks of columns run in
// parallel; each keeps its first best, and the chunks are compared in order.
Candidate best_column(const Whitened& wh, const std::vector<double>& Q, const std::vector<double>& cu,
                      const std::vector<double>& cl) {
  const index_t r = wh.r, d = static_cast<index_t>(wh.usable.size());
  const index_t chunks = (d + kBssChunk - 1) / kBssChunk;
  std::vector<Candidate> best(static_cast<std::size_t>(chunks));
  detail::parallel_tasks(
      chunks, 2.0 * static_cast<double>(d * r * r), [] { return std::vector<double>(); },
      [&](index_t t, std::vector<double>& Z) {
        const index_t c0 = t * kBssChunk, rows = std::min(kBssChunk, d - c0);
        Z.resize(static_cast<std::size_t>(rows * r));
        detail::dgemm_ab(rows, r, r, 1.0, wh.W.data() + c0 * r, r, Q.data(), r, 0.0, Z.data(), r);
        Candidate b;
        for (index_t i = 0; i < rows; ++i) {
          if (!wh.usable[c0 + i]) continue;
          const double* z = Z.data() + i * r;
          double su = 0.0, sl = 0.0;
          for (index_t k = 0; k < r; ++k) {
            su += z[k] * z[k] * cu[k];
            sl += z[k] * z[k] * cl[k];
          }
          if (su > 0.0 && sl - su > b.gap) b = {sl - su, su, sl, c0 + i};
        }
        best[t] = b;
      });
  Candidate pick;
  for (const Candidate& b : best)
    if (b.c >= 0 && b.gap > pick.gap) pick = b;
  if (pick.c < 0) detail::fail(ErrorKind::internal, "reduce_dimension (bss)", "no usable column");
  return pick;
}

// The m barrier steps of BSS (Theorem 3.1 with their d = kappa = m / r): the weight of every
// column, and the final A = sum_c s_c w_c w_c^T.
std::vector<double> bss_weights(const Whitened& wh, index_t m, std::vector<double>& A) {
  const index_t r = wh.r, d = static_cast<index_t>(wh.usable.size());
  const double rr = static_cast<double>(r), kappa = static_cast<double>(m) / rr, sk = std::sqrt(kappa);
  const double dL = 1.0, eL = 1.0 / sk, dU = (sk + 1.0) / (sk - 1.0), eU = (sk - 1.0) / (kappa + sk);
  double l = -rr / eL, u = rr / eU;
  A.assign(static_cast<std::size_t>(r * r), 0.0);
  std::vector<double> weight(static_cast<std::size_t>(d), 0.0), cu(static_cast<std::size_t>(r)),
      cl(static_cast<std::size_t>(r));
  for (index_t step = 0; step < m; ++step) {
    const double u1 = u + dU, l1 = l + dL;
    std::vector<double> Q = A;
    const std::vector<double> a = detail::symmetric_eigen(Q, r, "reduce_dimension (bss)");
    double phiU = 0.0, phiL = 0.0;  // Phi^u - Phi^u' > 0 and Phi_l' - Phi_l > 0
    for (index_t k = 0; k < r; ++k) {
      phiU += dU / ((u - a[k]) * (u1 - a[k]));
      phiL += dL / ((a[k] - l1) * (a[k] - l));
    }
    // U(v) = v^T (u'I - A)^-2 v / phiU + v^T (u'I - A)^-1 v and L(v) = v^T (A - l'I)^-2 v / phiL
    // - v^T (A - l'I)^-1 v; with z = Q^T v both are sums of z_k^2 times these.
    for (index_t k = 0; k < r; ++k) {
      const double pu = 1.0 / (u1 - a[k]), pl = 1.0 / (a[k] - l1);
      cu[k] = pu * pu / phiU + pu;
      cl[k] = pl * pl / phiL - pl;
    }
    const Candidate pick = best_column(wh, Q, cu, cl);
    // 1/t in [U, L] (non-empty by BSS Lemma 3.5; rounding may leave L a hair below U).
    const double tw = 2.0 / (pick.su + std::max(pick.sl, pick.su));
    const double* w = wh.W.data() + pick.c * r;
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < r; ++j) A[i * r + j] += tw * w[i] * w[j];
    weight[pick.c] += tw;
    u = u1;
    l = l1;
  }
  return weight;
}

// Batson-Spielman-Srivastava with barriers on the whitened columns. See the header for the
// guarantee. Deterministic: the steps run in order, and each step's choice does not depend on
// how its chunks were scheduled.
Reduced reduce_bss(ConstMatrix X, index_t m) {
  const index_t n = X.rows, d = X.cols;
  Reduced out;
  const auto take = [&](const std::vector<index_t>& cols, const std::vector<double>& weights) {
    out.columns = cols;
    out.weights = weights;
    const auto k = static_cast<index_t>(cols.size());
    out.Y = DenseMatrix<float>(n, k);
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < k; ++j)
        out.Y(i, j) = static_cast<float>(std::sqrt(weights[j]) * static_cast<double>(X(i, cols[j])));
  };
  if (m >= d) {  // every column with weight 1: X itself, exact
    std::vector<index_t> cols(static_cast<std::size_t>(d));
    for (index_t c = 0; c < d; ++c) cols[c] = c;
    take(cols, std::vector<double>(static_cast<std::size_t>(d), 1.0));
    return out;
  }
  const Whitened wh = whiten_columns(X);
  if (wh.r == 0) {  // X == 0: one (zero) column reproduces X X^T = 0
    take({0}, {1.0});
    return out;
  }
  LEVATTN_REQUIRE(m > wh.r, "m", "bss needs m > rank(x) = ", wh.r, " (or m = d = ", d, "), got ", m);
  std::vector<double> A;
  const std::vector<double> weight = bss_weights(wh, m, A);
  // Centre: scale by 2 / (lambda_min + lambda_max) of the final A.
  const std::vector<double> ev = detail::symmetric_eigen(A, wh.r, "reduce_dimension (bss)");
  const double scale = 2.0 / (ev[0] + ev[wh.r - 1]);
  std::vector<index_t> cols;
  std::vector<double> weights;
  for (index_t c = 0; c < d; ++c)
    if (weight[c] > 0.0) {
      cols.push_back(c);
      weights.push_back(weight[c] * scale);
    }
  take(cols, weights);
  return out;
}

void check_pair(ConstMatrix X, ConstMatrix Y) {
  detail::require_finite_matrix(X, "x");
  detail::require_finite_matrix(Y, "y");
  LEVATTN_REQUIRE(X.rows == Y.rows, "y", "expected ", X.rows, " rows (as x), got ", Y.rows);
}

// Rows i0 .. i0 + rows - 1 of Z Z^T into G (rows x n), float64, by blocks of kErrorRows rows.
void gram_rows(ConstMatrix Z, index_t i0, index_t rows, std::vector<double>& zi,
               std::vector<double>& zj, double* G) {
  const index_t n = Z.rows, d = Z.cols;
  const auto convert = [&](index_t r0, index_t k, std::vector<double>& buf) {
    buf.resize(static_cast<std::size_t>(k * d));
    for (index_t i = 0; i < k; ++i) {
      const float* src = Z.row(r0 + i);
      double* dst = buf.data() + i * d;
      for (index_t j = 0; j < d; ++j) dst[j] = src[j];
    }
  };
  convert(i0, rows, zi);
  for (index_t j0 = 0; j0 < n; j0 += kErrorRows) {
    const index_t cb = std::min(kErrorRows, n - j0);
    convert(j0, cb, zj);
    detail::dgemm_abt(rows, cb, d, 1.0, zi.data(), d, zj.data(), d, 0.0, G + j0, n);
  }
}

// Row-normalised exp of each row of G (rows x n), in place, with the row maximum subtracted.
void softmax_rows(double* G, index_t rows, index_t n) {
  for (index_t i = 0; i < rows; ++i) {
    double* g = G + i * n;
    const double mx = *std::max_element(g, g + n);
    double z = 0.0;
    for (index_t j = 0; j < n; ++j) z += (g[j] = std::exp(g[j] - mx));
    for (index_t j = 0; j < n; ++j) g[j] /= z;
  }
}

}  // namespace

namespace {

constexpr std::pair<ReduceMethod, const char*> kReduceNames[] = {
    {ReduceMethod::gaussian, "gaussian"}, {ReduceMethod::srht, "srht"}, {ReduceMethod::countsketch, "countsketch"},
    {ReduceMethod::svd, "svd"},           {ReduceMethod::bss, "bss"}};

}  // namespace

std::string to_string(ReduceMethod method) { return detail::name_of(kReduceNames, method); }
ReduceMethod parse_reduce_method(const std::string& name) { return detail::parse_name(kReduceNames, name, "method"); }

Reduced reduce_dimension(ConstMatrix X, const ReduceOptions& options) {
  detail::require_finite_matrix(X, "x");
  const index_t n = X.rows, d = X.cols;
  LEVATTN_REQUIRE(options.m >= 0 && options.m <= d, "m", "expected 1 <= m <= d = ", d, ", got ", options.m);
  LEVATTN_REQUIRE(options.delta > 0.0 && options.delta < 1.0, "delta", "expected a number in (0, 1), got ",
                  options.delta);
  const index_t m = options.m > 0 ? options.m : default_m(options.method, n, d, options.delta);
  Reduced r;
  switch (options.method) {
    case ReduceMethod::gaussian: r = reduce_sketch(X, m, SketchKind::gaussian, options.seed); break;
    case ReduceMethod::srht: r = reduce_sketch(X, m, SketchKind::srht, options.seed); break;
    case ReduceMethod::countsketch:
      r = reduce_sketch(X, m, SketchKind::countsketch, options.seed);
      break;
    case ReduceMethod::svd: r = reduce_svd(X, m); break;
    case ReduceMethod::bss: r = reduce_bss(X, m); break;
  }
  r.method = options.method;
  return r;
}

double softmax_gram_error(ConstMatrix X, ConstMatrix Y) {
  check_pair(X, Y);
  const index_t n = X.rows;
  const index_t blocks = (n + kErrorRows - 1) / kErrorRows;
  std::vector<double> block_max(static_cast<std::size_t>(blocks), 0.0);
  struct Workspace {
    std::vector<double> gx, gy, zi, zj;
  };
  const double flops = 2.0 * static_cast<double>(n) * static_cast<double>(n) *
                       static_cast<double>(X.cols + Y.cols);
  detail::parallel_tasks(blocks, flops, [] { return Workspace{}; }, [&](index_t b, Workspace& w) {
    const index_t i0 = b * kErrorRows, rows = std::min(kErrorRows, n - i0);
    w.gx.resize(static_cast<std::size_t>(rows * n));
    w.gy.resize(static_cast<std::size_t>(rows * n));
    gram_rows(X, i0, rows, w.zi, w.zj, w.gx.data());
    gram_rows(Y, i0, rows, w.zi, w.zj, w.gy.data());
    softmax_rows(w.gx.data(), rows, n);
    softmax_rows(w.gy.data(), rows, n);
    double e = 0.0;
    for (index_t k = 0; k < rows * n; ++k) e = std::max(e, std::fabs(w.gx[k] - w.gy[k]));
    block_max[b] = e;
  });
  return *std::max_element(block_max.begin(), block_max.end());
}

}  // namespace levattn
