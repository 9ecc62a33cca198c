// tests/cases.hpp: key matrices the properties are checked on: random, planted and adversarial.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "oracle.hpp"

namespace cases {

using oracle::index_t;
using oracle::Mat;

/// rows x cols (cols <= rows) with orthonormal columns (QR of a Gaussian), float64 row-major.
inline std::vector<double> orthonormal_columns(index_t rows, index_t cols, std::uint64_t seed) {
  const Mat g = oracle::gaussian(rows, cols, seed);
  std::vector<double> a(g.v.begin(), g.v.end()), tau(static_cast<std::size_t>(cols));
  LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, static_cast<lapack_int>(rows), static_cast<lapack_int>(cols), a.data(),
                 static_cast<lapack_int>(cols), tau.data());
  LAPACKE_dorgqr(LAPACK_ROW_MAJOR, static_cast<lapack_int>(rows), static_cast<lapack_int>(cols),
                 static_cast<lapack_int>(cols), a.data(), static_cast<lapack_int>(cols), tau.data());
  return a;
}

/// Random orthogonal n x n matrix, float64 row-major.
inline std::vector<double> orthogonal(index_t n, std::uint64_t seed) { return orthonormal_columns(n, n, seed); }

/// n x d with singular values logspaced from 1 to 1/cond.
inline Mat conditioned(index_t n, index_t d, double cond, std::uint64_t seed) {
  const std::vector<double> U = orthogonal(n, seed), W = orthogonal(d, seed + 1);
  Mat K(n, d);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) {
      double s = 0;
      for (index_t c = 0; c < d; ++c) {
        const double sv = std::pow(cond, -static_cast<double>(c) / static_cast<double>(d - 1));
        s += U[i * n + c] * sv * W[c * d + j];
      }
      K(i, j) = static_cast<float>(s);
    }
  return K;
}

/// Gaussian rows scaled by 1/u^2 (u uniform in [0.01, 1], capped at 1e4): heavy-tailed row norms.
inline Mat heavy_tailed(index_t n, index_t d, std::uint64_t seed) {
  Mat K = oracle::gaussian(n, d, seed);
  std::mt19937_64 g(seed + 1);
  std::uniform_real_distribution<double> u(1e-2, 1.0);
  for (index_t i = 0; i < n; ++i) {
    const double s = std::min(1.0 / std::pow(u(g), 2), 1e4);
    for (index_t j = 0; j < d; ++j) K(i, j) = static_cast<float>(K(i, j) * s);
  }
  return K;
}

/// The named key matrices every property test runs on.
inline std::vector<std::pair<std::string, Mat>> key_matrices() {
  std::vector<std::pair<std::string, Mat>> out;
  out.emplace_back("random", oracle::gaussian(200, 8, 11));
  {
    // Planted: 4 large keys in orthogonal directions among small noise keys.
    Mat K = oracle::gaussian(300, 8, 12, 0.05);
    for (index_t r = 0; r < 4; ++r)
      for (index_t j = 0; j < 8; ++j) K(37 * r + 5, j) = (j == r) ? 10.0f : 0.0f;
    out.emplace_back("planted", K);
  }
  // Rank 4 in dimension 10: K = A B.
  out.emplace_back("rank_deficient", oracle::product(oracle::gaussian(120, 4, 13), oracle::gaussian(4, 10, 14)));
  {
    // Every key twice, and one key five times.
    const Mat base = oracle::gaussian(40, 6, 15);
    Mat K(84, 6);
    for (index_t i = 0; i < 80; ++i)
      for (index_t j = 0; j < 6; ++j) K(i, j) = base(i / 2, j);
    for (index_t i = 80; i < 84; ++i)
      for (index_t j = 0; j < 6; ++j) K(i, j) = base(3, j);
    out.emplace_back("duplicates", K);
  }
  {
    Mat K = oracle::gaussian(60, 5, 16);
    for (index_t i = 0; i < 60; i += 6)
      for (index_t j = 0; j < 5; ++j) K(i, j) = 0.0f;
    out.emplace_back("zero_keys", K);
  }
  out.emplace_back("n_less_than_d", oracle::gaussian(5, 12, 17));
  out.emplace_back("condition_1e4", conditioned(80, 6, 1e4, 18));
  out.emplace_back("heavy_tailed", heavy_tailed(150, 6, 19));
  return out;
}

/// Queries that stress a key set: random ones plus, for every key, the worst-case query
/// M^+ k_j (computed from the SVD oracle: q = V S^-2 V^T k_j), which makes A_ij = tau_j.
inline Mat stress_queries(const Mat& K, index_t random_count, std::uint64_t seed) {
  const index_t n = K.rows, d = K.cols, r = std::min(n, d);
  std::vector<double> a(K.v.begin(), K.v.end()), s(static_cast<std::size_t>(r)), u(1),
      vt(static_cast<std::size_t>(r * d)), superb(static_cast<std::size_t>(r));
  LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'S', static_cast<lapack_int>(n), static_cast<lapack_int>(d),
                 a.data(), static_cast<lapack_int>(d), s.data(), u.data(), 1, vt.data(),
                 static_cast<lapack_int>(d), superb.data());
  Mat Q = oracle::gaussian(random_count + n, d, seed);
  for (index_t j = 0; j < n; ++j) {
    std::vector<double> q(static_cast<std::size_t>(d), 0.0);
    for (index_t c = 0; c < r; ++c) {
      if (!(s[c] > 1e-5 * s[0])) continue;
      double proj = 0;
      for (index_t t = 0; t < d; ++t) proj += vt[c * d + t] * K(j, t);
      for (index_t t = 0; t < d; ++t) q[t] += vt[c * d + t] * proj / (s[c] * s[c]);
    }
    double nrm = 0;
    for (double x : q) nrm = std::max(nrm, std::fabs(x));
    for (index_t t = 0; t < d; ++t)
      Q(random_count + j, t) = static_cast<float>(nrm > 0 ? q[t] / nrm : 0.0);
  }
  return Q;
}

}  // namespace cases
