// tests/oracle.hpp: independent reference computations for the tests, in float64 and written
// for clarity, not speed. None of them uses the library's algorithms.
#pragma once
#include <lapacke.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "levattn/levattn.hpp"

namespace oracle {

using levattn::index_t;

/// Row-major float32 matrix with its shape, owned.
struct Mat {
  index_t rows = 0, cols = 0;
  std::vector<float> v;
  Mat() = default;
  Mat(index_t r, index_t c) : rows(r), cols(c), v(static_cast<std::size_t>(r * c)) {}
  float& operator()(index_t i, index_t j) { return v[static_cast<std::size_t>(i * cols + j)]; }
  float operator()(index_t i, index_t j) const { return v[static_cast<std::size_t>(i * cols + j)]; }
  levattn::ConstMatrix view() const { return {v.data(), rows, cols}; }
};

inline Mat gaussian(index_t r, index_t c, std::uint64_t seed, double sd = 1.0) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, sd);
  Mat m(r, c);
  for (auto& x : m.v) x = static_cast<float>(nd(g));
  return m;
}

/// The OpenMP thread counts every thread-count invariance test runs with.
inline constexpr int kThreadCounts[] = {1, 2, 4, 8};

/// f() computed with each of kThreadCounts threads, in that order (the setting is restored).
template <class F>
auto at_each_thread_count(F&& f) {
  const int saved = omp_get_max_threads();
  std::vector<decltype(f())> out;
  for (int t : kThreadCounts) {
    omp_set_num_threads(t);
    out.push_back(f());
  }
  omp_set_num_threads(saved);
  return out;
}

/// A B with float64 accumulation, rounded to float32.
inline Mat product(const Mat& A, const Mat& B) {
  Mat C(A.rows, B.cols);
  for (index_t i = 0; i < A.rows; ++i)
    for (index_t j = 0; j < B.cols; ++j) {
      double s = 0;
      for (index_t c = 0; c < A.cols; ++c) s += static_cast<double>(A(i, c)) * B(c, j);
      C(i, j) = static_cast<float>(s);
    }
  return C;
}

/// The kind and message of the levattn::Error that f throws; (internal, "no error") if none.
inline std::pair<levattn::ErrorKind, std::string> error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const levattn::Error& e) {
    return {e.kind(), e.what()};
  }
  return {levattn::ErrorKind::internal, "no error"};
}

inline double dot(const Mat& A, index_t i, const Mat& B, index_t j) {
  double s = 0;
  for (index_t c = 0; c < A.cols; ++c) s += static_cast<double>(A(i, c)) * B(j, c);
  return s;
}

/// Leverage scores from the SVD of K (LAPACK dgesvd on float64 K): squared row norms of the left
/// singular vectors whose singular value exceeds rtol * sigma_max. With ridge > 0, scores are
/// sum_i U_ji^2 s_i^2 / (s_i^2 + ridge).
inline std::vector<double> leverage_svd(const Mat& K, double rtol = 1e-5, double ridge = 0.0,
                                        index_t* rank = nullptr) {
  const index_t n = K.rows, d = K.cols, r = std::min(n, d);
  std::vector<double> a(K.v.begin(), K.v.end()), s(static_cast<std::size_t>(r)),
      u(static_cast<std::size_t>(n * r)), vt(1), superb(static_cast<std::size_t>(r));
  LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'S', 'N', static_cast<lapack_int>(n), static_cast<lapack_int>(d),
                 a.data(), static_cast<lapack_int>(d), s.data(), u.data(), static_cast<lapack_int>(r),
                 vt.data(), 1, superb.data());
  index_t rk = 0;
  for (index_t i = 0; i < r; ++i) rk += (s[0] > 0 && s[i] > rtol * s[0]) ? 1 : 0;
  if (rank) *rank = rk;
  std::vector<double> tau(static_cast<std::size_t>(n), 0.0);
  for (index_t j = 0; j < n; ++j)
    for (index_t i = 0; i < (ridge > 0 ? r : rk); ++i) {
      const double w = ridge > 0 ? s[i] * s[i] / (s[i] * s[i] + ridge) : 1.0;
      tau[j] += u[j * r + i] * u[j * r + i] * w;
    }
  return tau;
}

/// A_ij = (q_i.k_j)^2 / sum_l (q_i.k_l)^2 for every (i, j) with A_ij >= eps, sorted.
struct Entry {
  index_t i, j;
  double a;
};
inline std::vector<Entry> heavy_x2(const Mat& Q, const Mat& K, double eps,
                                   std::vector<index_t>* zero = nullptr) {
  std::vector<Entry> out;
  for (index_t i = 0; i < Q.rows; ++i) {
    std::vector<double> s(static_cast<std::size_t>(K.rows));
    double z = 0;
    for (index_t j = 0; j < K.rows; ++j) {
      const double x = dot(Q, i, K, j);
      z += (s[j] = x * x);
    }
    if (z == 0) {
      if (zero) zero->push_back(i);
      continue;
    }
    for (index_t j = 0; j < K.rows; ++j)
      if (s[j] / z >= eps) out.push_back({i, j, s[j] / z});
  }
  return out;
}

/// Causal x^2: A_ij = (q_i.k_j)^2 / sum_{l <= i} (q_i.k_l)^2 for every j <= i with A_ij >= eps.
inline std::vector<Entry> heavy_x2_causal(const Mat& Q, const Mat& K, double eps) {
  std::vector<Entry> out;
  for (index_t i = 0; i < Q.rows; ++i) {
    std::vector<double> s(static_cast<std::size_t>(i + 1));
    double z = 0;
    for (index_t j = 0; j <= i; ++j) {
      const double x = dot(Q, i, K, j);
      z += (s[j] = x * x);
    }
    if (z == 0) continue;
    for (index_t j = 0; j <= i; ++j)
      if (s[j] / z >= eps) out.push_back({i, j, s[j] / z});
  }
  return out;
}

/// A_ij = |q_i.k_j|^p / sum_l |q_i.k_l|^p for every (i, j) with A_ij >= eps, sorted.
inline std::vector<Entry> heavy_power(const Mat& Q, const Mat& K, double eps, double p) {
  std::vector<Entry> out;
  for (index_t i = 0; i < Q.rows; ++i) {
    std::vector<double> s(static_cast<std::size_t>(K.rows));
    double z = 0;
    for (index_t j = 0; j < K.rows; ++j) z += (s[j] = std::pow(std::fabs(dot(Q, i, K, j)), p));
    if (z == 0) continue;
    for (index_t j = 0; j < K.rows; ++j)
      if (s[j] / z >= eps) out.push_back({i, j, s[j] / z});
  }
  return out;
}

/// Attention of one head over the keys allowed by mask(i, j), in float64.
inline std::vector<double> attention(const Mat& Q, const Mat& K, const Mat& V, bool softmax,
                                     double scale, double p,
                                     const std::function<bool(index_t, index_t)>& mask) {
  std::vector<double> out(static_cast<std::size_t>(Q.rows * V.cols), 0.0);
  for (index_t i = 0; i < Q.rows; ++i) {
    std::vector<double> w(static_cast<std::size_t>(K.rows), 0.0);
    double mx = -INFINITY;
    for (index_t j = 0; j < K.rows; ++j)
      if (mask(i, j)) mx = std::max(mx, scale * dot(Q, i, K, j));
    double z = 0;
    for (index_t j = 0; j < K.rows; ++j) {
      if (!mask(i, j)) continue;
      const double s = scale * dot(Q, i, K, j);
      w[j] = softmax ? std::exp(s - mx) : std::pow(std::fabs(s), p);
      z += w[j];
    }
    if (z == 0) continue;
    for (index_t j = 0; j < K.rows; ++j)
      for (index_t c = 0; c < V.cols; ++c) out[i * V.cols + c] += w[j] / z * V(j, c);
  }
  return out;
}

/// `size` independent N(0, 1) draws from `seed`, in float64 (as<float> rounds them).
inline std::vector<double> normal(std::size_t size, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<double> x(size);
  for (auto& v : x) v = nd(g);
  return x;
}

/// x converted entry by entry to T.
template <class T, class S>
std::vector<T> as(const std::vector<S>& x) {
  return std::vector<T>(x.begin(), x.end());
}

/// max_i |a_i - b_i| / max_i |b_i|: an error relative to the largest entry.
template <class T>
double rel_error(const std::vector<T>& a, const std::vector<double>& b) {
  double num = 0.0, den = 1e-300;
  for (std::size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / den;
}

/// Whether query i of pair h attends key j under `s`, read from the selection's fields (not
/// through its methods): all keys, the shared set of i's segment, the window band, i's own keys,
/// then the causal cut and the key mask.
inline bool attends(const levattn::Selection& s, index_t h, index_t i, index_t j) {
  bool in = s.all_keys || (s.window >= 0 && std::llabs(i - j) <= s.window);
  if (!s.shared_keys.empty()) {
    const index_t segments = s.segment > 0 ? (s.m + s.segment - 1) / s.segment : 1;
    const auto& set = s.shared_keys[static_cast<std::size_t>(h * segments + (s.segment > 0 ? i / s.segment : 0))];
    in = in || std::find(set.begin(), set.end(), j) != set.end();
  }
  for (index_t a = 0; a < s.top_k; ++a) in = in || s.query_keys[static_cast<std::size_t>((h * s.m + i) * s.top_k + a)] == j;
  const bool open = s.key_mask.empty() || s.key_mask[static_cast<std::size_t>(h / s.heads * s.n + j)] != 0;
  return in && open && !(s.causal && j > i);
}

/// The weight of key j in query i's attention under `s`: 1 if it attends j (attends), its residual
/// block's weight if j is one of the block's sampled keys (and not after i, if causal), else 0.
/// The block is found from the fields: blocks of 256 queries within each segment.
inline double key_weight(const levattn::Selection& s, index_t h, index_t i, index_t j) {
  if (attends(s, h, i, j)) return 1.0;
  if (s.residual == 0 || (s.causal && j > i)) return 0.0;
  const index_t len = s.segment > 0 ? s.segment : s.m, per_segment = (len + 255) / 256;
  const index_t blocks = (s.m + len - 1) / len * per_segment, block = h * blocks + i / len * per_segment + i % len / 256;
  for (index_t a = 0; a < s.residual; ++a)
    if (s.residual_keys[static_cast<std::size_t>(block * s.residual + a)] == j) return s.residual_weight[static_cast<std::size_t>(block)];
  return 0.0;
}

/// Attention over a selection and the gradients of sum(dout * out), in float64 with the n x n
/// weights written out as an autograd would: P, dP = dout V^T, dS through the row normalisation.
/// A key's kernel value is multiplied by its key_weight (sampled keys: their query's weight).
struct MaskedAttention {
  std::vector<double> out, dq, dk, dv;
};

/// Shapes as levattn::AttentionShape (grouped-query: query pair h reads kv pair sh.kv_pair(h),
/// whose dk and dv sum over its query heads); softmax, or |s|^p, of s = scale q.k.
inline MaskedAttention masked_attention(const levattn::AttentionShape& sh, const levattn::Selection& sel, bool softmax,
                                        double p, double scale, const std::vector<double>& q,
                                        const std::vector<double>& k, const std::vector<double>& v,
                                        const std::vector<double>& dout) {
  const index_t m = sh.m, n = sh.n, d = sh.d, dv = sh.dv, pairs = sh.batch * sh.heads, kv = sh.batch * sh.kv();
  MaskedAttention r{std::vector<double>(pairs * m * dv), std::vector<double>(pairs * m * d),
                    std::vector<double>(kv * n * d), std::vector<double>(kv * n * dv)};
  for (index_t h = 0; h < pairs; ++h) {
    const index_t g = sh.kv_pair(h);
    for (index_t i = 0; i < m; ++i) {
      std::vector<double> s(n), f(n), fp(n);
      std::vector<double> w(n);
      std::vector<char> in(n);
      double D = 0.0, smax = -INFINITY;
      for (index_t j = 0; j < n; ++j) {
        double dot = 0.0;
        for (index_t x = 0; x < d; ++x) dot += q[(h * m + i) * d + x] * k[(g * n + j) * d + x];
        s[j] = scale * dot;
        w[j] = key_weight(sel, h, i, j);
        in[j] = w[j] > 0.0;
        if (in[j] && softmax) smax = std::max(smax, s[j]);
      }
      for (index_t j = 0; j < n; ++j) {
        if (!in[j]) continue;
        f[j] = w[j] * (softmax ? std::exp(s[j] - smax) : std::pow(std::fabs(s[j]), p));
        fp[j] = softmax ? f[j] : w[j] * (s[j] == 0 ? 0.0 : p * std::pow(std::fabs(s[j]), p - 1) * (s[j] > 0 ? 1 : -1));
        D += f[j];
      }
      if (!(D > 0)) continue;
      std::vector<double> P(n), dP(n);
      double delta = 0.0;
      for (index_t j = 0; j < n; ++j) {
        P[j] = f[j] / D;
        for (index_t x = 0; x < dv; ++x) {
          r.out[(h * m + i) * dv + x] += P[j] * v[(g * n + j) * dv + x];
          dP[j] += dout[(h * m + i) * dv + x] * v[(g * n + j) * dv + x];
        }
        delta += P[j] * dP[j];
      }
      for (index_t j = 0; j < n; ++j) {
        if (!in[j]) continue;
        const double ds = fp[j] / D * (dP[j] - delta);  // d out / d s_ij through f and D
        for (index_t x = 0; x < d; ++x) {
          r.dq[(h * m + i) * d + x] += scale * ds * k[(g * n + j) * d + x];
          r.dk[(g * n + j) * d + x] += scale * ds * q[(h * m + i) * d + x];
        }
        for (index_t x = 0; x < dv; ++x) r.dv[(g * n + j) * dv + x] += P[j] * dout[(h * m + i) * dv + x];
      }
    }
  }
  return r;
}

}  // namespace oracle

namespace oracle {

/// Exact |x|^p sensitivity of key j (p >= 1): s_j = 1 / min { ||K y||_p^p : <k_j, y> = 1 }.
/// p = 1: the minimum of a convex piecewise-linear function sits where the constraint and up to
/// d - 1 conditions <k_l, y> = 0 hold; all such points are enumerated (small n and d only).
/// p > 1: Newton's method with backtracking on the (d-1)-dimensional affine set, with the
/// smoothing (r^2 + mu^2)^(p/2) driven to mu = 0 for p < 2.
inline double exact_sensitivity(const Mat& K, index_t j, double p) {
  const index_t n = K.rows, d = K.cols;
  std::vector<double> kj(static_cast<std::size_t>(d));
  double nk = 0;
  for (index_t c = 0; c < d; ++c) nk += (kj[c] = K(j, c)) * K(j, c);
  if (nk == 0) return 0.0;
  const auto objective = [&](const std::vector<double>& y) {
    double f = 0;
    for (index_t l = 0; l < n; ++l) {
      double r = 0;
      for (index_t c = 0; c < d; ++c) r += K(l, c) * y[c];
      f += std::pow(std::fabs(r), p);
    }
    return f;
  };
  double best = INFINITY;
  if (p == 1.0) {
    // Rows of B: k_j then the keys of S; solve B y = e_1 with the minimum-norm solution.
    std::vector<index_t> S;
    const std::function<void(index_t)> rec = [&](index_t start) {
      const index_t rows = static_cast<index_t>(S.size()) + 1;
      std::vector<double> B(static_cast<std::size_t>(rows * d)), G(static_cast<std::size_t>(rows * rows)),
          rhs(static_cast<std::size_t>(rows), 0.0);
      for (index_t c = 0; c < d; ++c) B[c] = kj[c];
      for (index_t a = 0; a < rows - 1; ++a)
        for (index_t c = 0; c < d; ++c) B[(a + 1) * d + c] = K(S[a], c);
      for (index_t a = 0; a < rows; ++a)
        for (index_t b = 0; b < rows; ++b) {
          double s = 0;
          for (index_t c = 0; c < d; ++c) s += B[a * d + c] * B[b * d + c];
          G[a * rows + b] = s;
        }
      rhs[0] = 1;
      std::vector<lapack_int> piv(static_cast<std::size_t>(rows));
      std::vector<double> Gc = G;
      double scale = 0;
      for (double x : G) scale = std::max(scale, std::fabs(x));
      if (LAPACKE_dgesv(LAPACK_ROW_MAJOR, static_cast<lapack_int>(rows), 1, Gc.data(),
                        static_cast<lapack_int>(rows), piv.data(), rhs.data(), 1) == 0) {
        bool ok = true;
        for (index_t a = 0; a < rows; ++a) ok = ok && std::fabs(Gc[a * rows + a]) > 1e-10 * scale;
        if (ok) {
          std::vector<double> y(static_cast<std::size_t>(d), 0.0);
          for (index_t a = 0; a < rows; ++a)
            for (index_t c = 0; c < d; ++c) y[c] += rhs[a] * B[a * d + c];
          best = std::min(best, objective(y));
        }
      }
      if (rows >= d) return;
      for (index_t l = start; l < n; ++l) {
        if (l == j) continue;
        S.push_back(l);
        rec(l + 1);
        S.pop_back();
      }
    };
    rec(0);
    return best > 0 ? 1.0 / best : 0.0;
  }
  // Orthonormal basis N of k_j's complement (Gram-Schmidt on the unit vectors).
  std::vector<std::vector<double>> basis;
  std::vector<double> u0(kj);
  for (double& x : u0) x /= std::sqrt(nk);
  basis.push_back(u0);
  for (index_t e = 0; e < d && static_cast<index_t>(basis.size()) < d; ++e) {
    std::vector<double> v(static_cast<std::size_t>(d), 0.0);
    v[e] = 1;
    for (int pass = 0; pass < 2; ++pass)
      for (const auto& b : basis) {
        double s = 0;
        for (index_t c = 0; c < d; ++c) s += v[c] * b[c];
        for (index_t c = 0; c < d; ++c) v[c] -= s * b[c];
      }
    double nv = 0;
    for (double x : v) nv += x * x;
    if (nv > 1e-12) {
      for (double& x : v) x /= std::sqrt(nv);
      basis.push_back(v);
    }
  }
  const index_t m = d - 1;
  std::vector<double> y0(kj);
  for (double& x : y0) x /= nk;
  const auto point = [&](const std::vector<double>& z) {
    std::vector<double> y(y0);
    for (index_t a = 0; a < m; ++a)
      for (index_t c = 0; c < d; ++c) y[c] += z[a] * basis[a + 1][c];
    return y;
  };
  std::vector<double> z(static_cast<std::size_t>(m), 0.0);
  for (double mu : {1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 0.0}) {
    if (p >= 2 && mu > 0) continue;
    const auto smooth = [&](const std::vector<double>& zz) {
      const auto y = point(zz);
      double f = 0;
      for (index_t l = 0; l < n; ++l) {
        double r = 0;
        for (index_t c = 0; c < d; ++c) r += K(l, c) * y[c];
        f += std::pow(r * r + mu * mu, p / 2);
      }
      return f;
    };
    for (int it = 0; it < 300; ++it) {
      const auto y = point(z);
      std::vector<double> g(static_cast<std::size_t>(m), 0.0), H(static_cast<std::size_t>(m * m), 0.0);
      for (index_t l = 0; l < n; ++l) {
        double r = 0;
        for (index_t c = 0; c < d; ++c) r += K(l, c) * y[c];
        std::vector<double> t(static_cast<std::size_t>(m));
        for (index_t a = 0; a < m; ++a) {
          double s = 0;
          for (index_t c = 0; c < d; ++c) s += K(l, c) * basis[a + 1][c];
          t[a] = s;
        }
        const double q = r * r + mu * mu;
        const double g1 = q > 0 ? p * r * std::pow(q, p / 2 - 1) : 0.0;
        const double h1 = q > 0 ? p * std::pow(q, p / 2 - 1) + p * (p - 2) * r * r * std::pow(q, p / 2 - 2) : 0.0;
        for (index_t a = 0; a < m; ++a) {
          g[a] += g1 * t[a];
          for (index_t b = 0; b < m; ++b) H[a * m + b] += h1 * t[a] * t[b];
        }
      }
      double gn = 0, hmax = 0;
      for (double x : g) gn = std::max(gn, std::fabs(x));
      for (double x : H) hmax = std::max(hmax, std::fabs(x));
      if (gn < 1e-13) break;
      for (index_t a = 0; a < m; ++a) H[a * m + a] += 1e-12 * (hmax + 1e-300);
      std::vector<double> step(g);
      std::vector<lapack_int> piv(static_cast<std::size_t>(std::max<index_t>(m, 1)));
      if (m == 0 || LAPACKE_dgesv(LAPACK_ROW_MAJOR, static_cast<lapack_int>(m), 1, H.data(),
                                  static_cast<lapack_int>(m), piv.data(), step.data(), 1) != 0)
        break;
      const double f0 = smooth(z);
      double t = 1;
      std::vector<double> zn(z);
      bool moved = false;
      for (int ls = 0; ls < 60; ++ls, t *= 0.5) {
        for (index_t a = 0; a < m; ++a) zn[a] = z[a] - t * step[a];
        if (smooth(zn) < f0) {
          moved = true;
          break;
        }
      }
      if (!moved) break;
      z = zn;
    }
  }
  best = objective(point(z));
  return 1.0 / best;
}

}  // namespace oracle
