// Feature-dimension reduction X (n x d) -> Y (n x m) preserving the softmax Gram matrix:
// sketches of the feature dimension, the thin SVD, and deterministic BSS sparsification.
#include "levattn/reduce.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <vector>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/sketch.hpp"

namespace levattn {
namespace {

constexpr double kRankRtol = 1e-6;       // singular values <= kRankRtol * sigma_max count as 0
constexpr index_t kErrorRows = 64;       // rows per block of softmax_gram_error
constexpr index_t kBssChunk = 512;       // candidate columns per task of a BSS step

lapack_int li(index_t v) { return static_cast<lapack_int>(v); }

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

// Symmetric eigendecomposition of the k x k matrix in `a` (overwritten by the eigenvectors, in
// columns) into w, eigenvalues ascending. Call it where LAPACK runs serially (inside an active
// parallel region, or through symmetric_eigen).
void eigen_in_place(std::vector<double>& a, index_t k, std::vector<double>& w, const char* what) {
  w.resize(static_cast<std::size_t>(k));
  const lapack_int info = LAPACKE_dsyevd(LAPACK_ROW_MAJOR, 'V', 'U', li(k), a.data(), li(k), w.data());
  if (info != 0)
    throw Error(ErrorKind::internal,
                std::string(what) + ": LAPACKE_dsyevd failed with info " + std::to_string(info));
}

// The same with serial LAPACK: deterministic and cheap for small k.
std::vector<double> symmetric_eigen(std::vector<double>& a, index_t k, const char* what) {
  std::vector<double> w;
  detail::with_serial_blas([&] { eigen_in_place(a, k, w, what); });
  return w;
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
  detail::with_serial_blas([&] {
    info = LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'N', li(n), li(d), a.data(), li(d), s.data(),
                          u.data(), li(k), vt.data(), 1, superb.data());
  });
  if (info != 0)
    throw Error(ErrorKind::internal, "reduce_dimension: LAPACKE_dgesvd failed with info " +
                                         std::to_string(info));
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

// Batson-Spielman-Srivastava with barriers, on the whitened columns w_c = Lambda_r^-1/2 V_r^T x^(c)
// (sum_c w_c w_c^T = I_r). See the header for the guarantee.
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

  // M = X X^T in float64 and its range.
  const std::vector<double> xd = to_double(X);
  std::vector<double> V(static_cast<std::size_t>(n * n), 0.0);
  detail::with_serial_blas([&] {
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, detail::bi(n), detail::bi(d), 1.0, xd.data(),
                detail::bi(d), 0.0, V.data(), detail::bi(n));
  });
  const std::vector<double> lam = symmetric_eigen(V, n, "reduce_dimension (bss)");
  const double lmax = lam[n - 1];
  index_t r = 0;
  for (index_t i = 0; i < n; ++i) r += (lmax > 0.0 && lam[i] > kRankRtol * kRankRtol * lmax) ? 1 : 0;
  if (r == 0) {  // X == 0: one (zero) column reproduces X X^T = 0
    take({0}, {1.0});
    return out;
  }
  if (m <= r) {
    std::ostringstream os;
    os << "m: bss needs m > rank(x) = " << r << " (or m = d = " << d << "), got " << m;
    detail::invalid(os.str());
  }
  // B = V_r Lambda_r^-1/2 (n x r), eigenvalues descending; W = X^T B (d x r), row c = w_c.
  std::vector<double> B(static_cast<std::size_t>(n * r));
  for (index_t c = 0; c < r; ++c) {
    const index_t e = n - 1 - c;
    const double sc = 1.0 / std::sqrt(lam[e]);
    for (index_t i = 0; i < n; ++i) B[i * r + c] = V[i * n + e] * sc;
  }
  std::vector<double> W(static_cast<std::size_t>(d * r));
  detail::with_serial_blas([&] {
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, detail::bi(d), detail::bi(r), detail::bi(n), 1.0,
                xd.data(), detail::bi(d), B.data(), detail::bi(r), 0.0, W.data(), detail::bi(r));
  });
  std::vector<char> usable(static_cast<std::size_t>(d));
  for (index_t c = 0; c < d; ++c) {
    double s = 0.0;
    for (index_t k = 0; k < r; ++k) s += W[c * r + k] * W[c * r + k];
    usable[c] = s > 0.0;
  }

  // Barrier parameters (BSS, Theorem 3.1 with their d = kappa).
  const double rr = static_cast<double>(r), kappa = static_cast<double>(m) / rr,
               sk = std::sqrt(kappa);
  const double dL = 1.0, eL = 1.0 / sk, dU = (sk + 1.0) / (sk - 1.0), eU = (sk - 1.0) / (kappa + sk);
  const double l0 = -rr / eL, u0 = rr / eU;

  // One parallel region for all m steps, with one barrier per step (the end of the chunk loop):
  // every thread keeps its own copy of A and computes the same eigendecomposition and the same
  // choice from the per-chunk results (serial LAPACK, identical inputs, so identical bits), which
  // spares a second barrier; the per-chunk results are double-buffered by step parity so that a
  // thread starting step s + 1 never overwrites what another still reads for step s.
  const index_t chunks = (d + kBssChunk - 1) / kBssChunk;
  struct Best {
    double gap, su, sl;
    index_t c;
  };
  std::vector<Best> best(static_cast<std::size_t>(2 * chunks));
  std::vector<double> weight(static_cast<std::size_t>(d), 0.0), A_final;
  detail::ExceptionTrap trap;
#pragma omp parallel
  {
    std::vector<double> A(static_cast<std::size_t>(r * r), 0.0), Q, a, Z;
    std::vector<double> cu(static_cast<std::size_t>(r)), cl(static_cast<std::size_t>(r));
    double l = l0, u = u0;
    bool ok = true;  // this thread's state is valid (an exception leaves it false; all threads
                     // still pass every barrier, and the trap rethrows after the region)
    for (index_t step = 0; step < m; ++step) {
      const double u1 = u + dU, l1 = l + dL;
      Best* slot = best.data() + (step % 2) * chunks;
      if (ok) {
        trap.run([&] {
          ok = false;
          Q = A;
          eigen_in_place(Q, r, a, "reduce_dimension (bss)");
          double phiU = 0.0, phiL = 0.0;  // Phi^u - Phi^u' > 0 and Phi_l' - Phi_l > 0
          for (index_t k = 0; k < r; ++k) {
            phiU += dU / ((u - a[k]) * (u1 - a[k]));
            phiL += dL / ((a[k] - l1) * (a[k] - l));
          }
          // U(v) = v^T (u'I - A)^-2 v / phiU + v^T (u'I - A)^-1 v and L(v) = v^T (A - l'I)^-2 v /
          // phiL - v^T (A - l'I)^-1 v; with z = Q^T v both are sums of z_k^2 times these.
          for (index_t k = 0; k < r; ++k) {
            const double pu = 1.0 / (u1 - a[k]), pl = 1.0 / (a[k] - l1);
            cu[k] = pu * pu / phiU + pu;
            cl[k] = pl * pl / phiL - pl;
          }
          ok = true;
        });
      }
#pragma omp for schedule(dynamic, 1)
      for (index_t t = 0; t < chunks; ++t) {
        slot[t] = {-std::numeric_limits<double>::infinity(), 0.0, 0.0, -1};
        if (!ok) continue;
        trap.run([&] {
          const index_t c0 = t * kBssChunk, rows = std::min(kBssChunk, d - c0);
          Z.resize(static_cast<std::size_t>(rows * r));
          detail::dgemm_ab(rows, r, r, 1.0, W.data() + c0 * r, r, Q.data(), r, 0.0, Z.data(), r);
          Best b = slot[t];
          for (index_t i = 0; i < rows; ++i) {
            if (!usable[c0 + i]) continue;
            const double* z = Z.data() + i * r;
            double su = 0.0, sl = 0.0;
            for (index_t k = 0; k < r; ++k) {
              su += z[k] * z[k] * cu[k];
              sl += z[k] * z[k] * cl[k];
            }
            if (su > 0.0 && sl - su > b.gap) b = {sl - su, su, sl, c0 + i};
          }
          slot[t] = b;
        });
      }
      // Implicit barrier: every chunk's best is in `slot`. The column of largest gap, ties to
      // the lower index (chunks in order, strict comparison).
      Best pick = {-std::numeric_limits<double>::infinity(), 0.0, 0.0, -1};
      for (index_t t = 0; t < chunks; ++t)
        if (slot[t].c >= 0 && slot[t].gap > pick.gap) pick = slot[t];
      if (ok && pick.c < 0) {
        ok = false;
        trap.run([] { throw Error(ErrorKind::internal, "reduce_dimension (bss): no usable column"); });
      }
      if (!ok) continue;
      // 1/t in [U, L] (non-empty by BSS Lemma 3.5; rounding may leave L a hair below U).
      const double tw = 2.0 / (pick.su + std::max(pick.sl, pick.su));
      const double* w = W.data() + pick.c * r;
      for (index_t i = 0; i < r; ++i)
        for (index_t j = 0; j < r; ++j) A[i * r + j] += tw * w[i] * w[j];
#pragma omp master
      weight[pick.c] += tw;
      u = u1;
      l = l1;
    }
#pragma omp master
    A_final = A;
  }
  trap.rethrow();

  // Centre: scale by 2 / (lambda_min + lambda_max) of the final A = sum_c s_c w_c w_c^T.
  std::vector<double> Af = A_final;
  const std::vector<double> ev = symmetric_eigen(Af, r, "reduce_dimension (bss)");
  const double scale = 2.0 / (ev[0] + ev[r - 1]);
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
  if (X.rows != Y.rows) {
    std::ostringstream os;
    os << "y: expected " << X.rows << " rows (as x), got " << Y.rows;
    detail::invalid(os.str());
  }
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

std::string to_string(ReduceMethod method) {
  switch (method) {
    case ReduceMethod::gaussian: return "gaussian";
    case ReduceMethod::srht: return "srht";
    case ReduceMethod::countsketch: return "countsketch";
    case ReduceMethod::svd: return "svd";
    case ReduceMethod::bss: return "bss";
  }
  return "unknown";
}

ReduceMethod parse_reduce_method(const std::string& name) {
  for (ReduceMethod m : {ReduceMethod::gaussian, ReduceMethod::srht, ReduceMethod::countsketch,
                         ReduceMethod::svd, ReduceMethod::bss})
    if (name == to_string(m)) return m;
  throw Error(ErrorKind::invalid_argument,
              "method: expected gaussian, srht, countsketch, svd or bss, got '" + name + "'");
}

Reduced reduce_dimension(ConstMatrix X, const ReduceOptions& options) {
  detail::require_finite_matrix(X, "x");
  const index_t n = X.rows, d = X.cols;
  if (options.m < 0 || options.m > d) {
    std::ostringstream os;
    os << "m: expected 1 <= m <= d = " << d << ", got " << options.m;
    detail::invalid(os.str());
  }
  if (!(options.delta > 0.0 && options.delta < 1.0)) {
    std::ostringstream os;
    os << "delta: expected a number in (0, 1), got " << options.delta;
    detail::invalid(os.str());
  }
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
  detail::ExceptionTrap trap;
#pragma omp parallel
  {
    std::vector<double> gx, gy, zi, zj;
#pragma omp for schedule(dynamic, 1)
    for (index_t b = 0; b < blocks; ++b) {
      trap.run([&] {
        const index_t i0 = b * kErrorRows, rows = std::min(kErrorRows, n - i0);
        gx.resize(static_cast<std::size_t>(rows * n));
        gy.resize(static_cast<std::size_t>(rows * n));
        gram_rows(X, i0, rows, zi, zj, gx.data());
        gram_rows(Y, i0, rows, zi, zj, gy.data());
        softmax_rows(gx.data(), rows, n);
        softmax_rows(gy.data(), rows, n);
        double e = 0.0;
        for (index_t k = 0; k < rows * n; ++k) e = std::max(e, std::fabs(gx[k] - gy[k]));
        block_max[b] = e;
      });
    }
  }
  trap.rethrow();
  return *std::max_element(block_max.begin(), block_max.end());
}

}  // namespace levattn
