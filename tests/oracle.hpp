// tests/oracle.hpp: independent reference computations for the tests, in float64 and written
// for clarity, not speed. None of them uses the library's algorithms.
#pragma once
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
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
    for (index_t j = 0; j < K.rows; ++j) z += (s[j] = std::pow(dot(Q, i, K, j), 2));
    if (z == 0) {
      if (zero) zero->push_back(i);
      continue;
    }
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

/// max_i |a_i - b_i| / max(max_i |b_i|, tiny): error relative to the output's scale.
inline double max_rel_error(const std::vector<float>& a, const std::vector<double>& b) {
  double err = 0, scale = 1e-30;
  for (std::size_t i = 0; i < b.size(); ++i) {
    err = std::max(err, std::fabs(a[i] - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return err / scale;
}

}  // namespace oracle
