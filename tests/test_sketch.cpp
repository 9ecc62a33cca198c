#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <limits>

#include "oracle.hpp"

using namespace levattn;
using oracle::Mat;

namespace {

const SketchKind kKinds[] = {SketchKind::countsketch, SketchKind::srht, SketchKind::gaussian};

double frob2(const Mat& A) {
  double s = 0;
  for (float x : A.v) s += static_cast<double>(x) * x;
  return s;
}
double frob2(const DenseMatrix<double>& A) {
  double s = 0;
  for (double x : A.data) s += x * x;
  return s;
}

/// Singular values of a row-major float64 matrix, descending.
std::vector<double> singular_values(const DenseMatrix<double>& A) {
  std::vector<double> a = A.data, s(static_cast<std::size_t>(std::min(A.rows, A.cols))),
                      superb(s.size() + 1), dummy(1);
  LAPACKE_dgesvd(LAPACK_ROW_MAJOR, 'N', 'N', static_cast<lapack_int>(A.rows),
                 static_cast<lapack_int>(A.cols), a.data(), static_cast<lapack_int>(A.cols), s.data(),
                 dummy.data(), 1, dummy.data(), 1, superb.data());
  return s;
}

/// n x d with orthonormal columns (QR of a Gaussian), as float32.
Mat orthonormal_columns(index_t n, index_t d, std::uint64_t seed) {
  const Mat g = oracle::gaussian(n, d, seed);
  std::vector<double> a(g.v.begin(), g.v.end()), tau(static_cast<std::size_t>(d));
  LAPACKE_dgeqrf(LAPACK_ROW_MAJOR, static_cast<lapack_int>(n), static_cast<lapack_int>(d), a.data(),
                 static_cast<lapack_int>(d), tau.data());
  LAPACKE_dorgqr(LAPACK_ROW_MAJOR, static_cast<lapack_int>(n), static_cast<lapack_int>(d),
                 static_cast<lapack_int>(d), a.data(), static_cast<lapack_int>(d), tau.data());
  Mat Q(n, d);
  for (std::size_t i = 0; i < a.size(); ++i) Q.v[i] = static_cast<float>(a[i]);
  return Q;
}

/// The n x n identity: sketch_rows(I) is S itself.
Mat identity(index_t n) {
  Mat I(n, n);
  for (index_t i = 0; i < n; ++i) I(i, i) = 1.0f;
  return I;
}

using oracle::error_of;

}  // namespace

TEST(Sketch, NamesRoundTrip) {
  for (SketchKind k : kKinds) EXPECT_EQ(parse_sketch_kind(to_string(k)), k);
  EXPECT_EQ(to_string(SketchKind::countsketch), "countsketch");
  EXPECT_EQ(to_string(SketchKind::srht), "srht");
  EXPECT_EQ(to_string(SketchKind::gaussian), "gaussian");
  const auto r = error_of([] { parse_sketch_kind("fourier"); });
  EXPECT_EQ(r.first, ErrorKind::invalid_argument);
  EXPECT_EQ(r.second, "sketch: expected countsketch, srht or gaussian, got 'fourier'");
}

TEST(Sketch, PreservesSquaredNormInExpectation) {
  // E[S^T S] = I: E ||S A||_F^2 = ||A||_F^2. One draw has relative sd about sqrt(2 / (s rank));
  // the mean over 40 seeds is within 5% with a wide margin.
  const Mat A = oracle::gaussian(300, 8, 11);
  const double ref = frob2(A);
  for (SketchKind k : kKinds) {
    double mean = 0;
    for (std::uint64_t seed = 0; seed < 40; ++seed) mean += frob2(sketch_rows(A.view(), 64, k, seed)) / ref;
    mean /= 40;
    EXPECT_NEAR(mean, 1.0, 0.05) << to_string(k);
  }
}

TEST(Sketch, SubspaceEmbedding) {
  // A (2000 x 10) has orthonormal columns: the singular values of S A are those of S on range(A).
  const Mat A = orthonormal_columns(2000, 10, 3);
  for (SketchKind k : kKinds) {
    const index_t s = k == SketchKind::countsketch ? 2000 : 400;
    for (std::uint64_t seed : {1u, 2u, 3u}) {
      const std::vector<double> sv = singular_values(sketch_rows(A.view(), s, k, seed));
      ASSERT_EQ(sv.size(), 10u);
      EXPECT_LE(sv.front(), 1.35) << to_string(k) << " seed " << seed;
      EXPECT_GE(sv.back(), 0.65) << to_string(k) << " seed " << seed;
    }
  }
}

TEST(Sketch, DeterministicBySeedAndThreadCount) {
  const Mat A = oracle::gaussian(3000, 40, 5);
  for (SketchKind k : kKinds) {
    const index_t s = 200;
    const DenseMatrix<double> one = sketch_rows(A.view(), s, k, 7);
    for (const auto& r : oracle::at_each_thread_count([&] { return sketch_rows(A.view(), s, k, 7).data; }))
      EXPECT_EQ(one.data, r) << to_string(k);  // bit for bit
    const DenseMatrix<double> other = sketch_rows(A.view(), s, k, 8);
    EXPECT_NE(one.data, other.data) << to_string(k);
    EXPECT_EQ(one.rows, s);
    EXPECT_EQ(one.cols, 40);
  }
}

TEST(Sketch, Float64InputUsesTheSameMatrix) {
  const Mat A = oracle::gaussian(500, 7, 9);
  // float64 copy with a leading dimension larger than d.
  const index_t ld = 10;
  std::vector<double> a(static_cast<std::size_t>(500 * ld), -1e300);
  for (index_t i = 0; i < 500; ++i)
    for (index_t j = 0; j < 7; ++j) a[i * ld + j] = A(i, j);
  for (SketchKind k : kKinds) {
    const DenseMatrix<double> y32 = sketch_rows(A.view(), 50, k, 4);
    const DenseMatrix<double> y64 = sketch_rows(a.data(), 500, 7, ld, 50, k, 4);
    ASSERT_EQ(y64.rows, 50);
    ASSERT_EQ(y64.cols, 7);
    for (std::size_t i = 0; i < y32.data.size(); ++i)
      EXPECT_NEAR(y32.data[i], y64.data[i], 1e-12 * (1 + std::fabs(y32.data[i]))) << to_string(k);
  }
}

TEST(Sketch, SameMatrixForEveryColumnCount) {
  // S depends on (kind, seed, n, s) only: sketching A's columns separately (through ld) gives the
  // columns of S A, across the gaussian's 2048-column task boundary too.
  const index_t n = 300, d = 2100, s = 40;
  const Mat A32 = oracle::gaussian(n, d, 17);
  const std::vector<double> A(A32.v.begin(), A32.v.end());
  for (SketchKind k : kKinds) {
    const DenseMatrix<double> full = sketch_rows(A.data(), n, d, d, s, k, 2);
    for (const index_t c0 : {index_t{0}, index_t{2045}}) {
      const DenseMatrix<double> part = sketch_rows(A.data() + c0, n, 5, d, s, k, 2);
      for (index_t i = 0; i < s; ++i)
        for (index_t j = 0; j < 5; ++j)
          EXPECT_NEAR(part(i, j), full(i, c0 + j), 1e-12 * (1 + std::fabs(full(i, c0 + j))))
              << to_string(k) << " column " << c0 + j;
    }
  }
}

TEST(Sketch, Linear) {
  // S (a A + b B) = a S A + b S B: the same S for every input of the shape.
  const index_t n = 12, d = 5, s = 8;
  const Mat A32 = oracle::gaussian(n, d, 1), B32 = oracle::gaussian(n, d, 2);
  const double a = 0.75, b = -2.5;
  std::vector<double> A(A32.v.begin(), A32.v.end()), B(B32.v.begin(), B32.v.end()), C(A.size());
  for (std::size_t i = 0; i < C.size(); ++i) C[i] = a * A[i] + b * B[i];
  for (SketchKind k : kKinds) {
    const auto SA = sketch_rows(A.data(), n, d, d, s, k, 3), SB = sketch_rows(B.data(), n, d, d, s, k, 3),
               SC = sketch_rows(C.data(), n, d, d, s, k, 3);
    for (std::size_t i = 0; i < SC.data.size(); ++i)
      EXPECT_NEAR(SC.data[i], a * SA.data[i] + b * SB.data[i], 1e-12) << to_string(k);
  }
}

TEST(Sketch, SrhtWithoutSamplingIsAnIsometry) {
  // s = n': P is a permutation, S^T S = D H^T H D = I, so (S A)^T (S A) = A^T A to rounding,
  // with n = 12 padded to 16 and n = 1000 padded to 1024.
  for (const index_t n : {index_t{12}, index_t{1000}}) {
    const index_t np = n == 12 ? 16 : 1024, d = 5;
    const Mat A = oracle::gaussian(n, d, 21);
    const DenseMatrix<double> Y = sketch_rows(A.view(), np, SketchKind::srht, 6);
    for (index_t p = 0; p < d; ++p)
      for (index_t q = 0; q < d; ++q) {
        double g = 0, ref = 0;
        for (index_t i = 0; i < np; ++i) g += Y(i, p) * Y(i, q);
        for (index_t i = 0; i < n; ++i) ref += static_cast<double>(A(i, p)) * A(i, q);
        EXPECT_NEAR(g, ref, 1e-10 * static_cast<double>(n)) << "n " << n << " (" << p << ", " << q << ")";
      }
  }
}

TEST(Sketch, SrhtEntriesAndOrthogonalRows) {
  // Every entry of sqrt(n'/s) P H D is +-1/sqrt(s); for n = n' the rows are orthogonal:
  // S S^T = (n'/s) I.
  const index_t s = 6;
  const Mat I12 = identity(12);
  const DenseMatrix<double> S12 = sketch_rows(I12.view(), s, SketchKind::srht, 2);
  for (double x : S12.data) EXPECT_NEAR(std::fabs(x), 1.0 / std::sqrt(6.0), 1e-15);
  const Mat I16 = identity(16);
  const DenseMatrix<double> S = sketch_rows(I16.view(), s, SketchKind::srht, 2);
  for (index_t p = 0; p < s; ++p)
    for (index_t q = 0; q < s; ++q) {
      double g = 0;
      for (index_t j = 0; j < 16; ++j) g += S(p, j) * S(q, j);
      EXPECT_NEAR(g, p == q ? 16.0 / 6.0 : 0.0, 1e-13);
    }
}

TEST(Sketch, SrhtMatchesADenseConstruction) {
  // S = sketch_rows(I_12) must be sqrt(16/s) P H D for the naive Sylvester-Hadamard H (16 x 16,
  // orthonormal) restricted to the first 12 columns, some signs D and s distinct rows P. Rows of H
  // multiply entrywise as H_a o H_b = H_(a xor b), so D is only determined up to such a product:
  // try D = sqrt(s) S_0 o H_p for every p and accept if every row of S then is a distinct row of H.
  const index_t n = 12, np = 16, s = 5;
  std::vector<double> H(static_cast<std::size_t>(np * np));
  for (index_t a = 0; a < np; ++a)
    for (index_t b = 0; b < np; ++b) H[a * np + b] = (__builtin_popcountll(a & b) % 2 ? -1.0 : 1.0) / 4.0;
  const Mat I = identity(n);
  for (std::uint64_t seed : {0u, 1u, 2u, 3u}) {
    const DenseMatrix<double> S = sketch_rows(I.view(), s, SketchKind::srht, seed);
    const double c = std::sqrt(static_cast<double>(np) / static_cast<double>(s));
    bool found = false;
    for (index_t p = 0; p < np && !found; ++p) {
      std::vector<double> D(static_cast<std::size_t>(n));
      for (index_t j = 0; j < n; ++j) D[j] = S(0, j) / (c * H[p * np + j]);  // +-1
      std::vector<index_t> rows;
      for (index_t k = 0; k < s; ++k)
        for (index_t q = 0; q < np; ++q) {
          bool match = true;
          for (index_t j = 0; j < n; ++j) match = match && std::fabs(S(k, j) - c * H[q * np + j] * D[j]) < 1e-14;
          if (match) {
            rows.push_back(q);
            break;
          }
        }
      std::sort(rows.begin(), rows.end());
      found = static_cast<index_t>(rows.size()) == s && std::adjacent_find(rows.begin(), rows.end()) == rows.end();
    }
    EXPECT_TRUE(found) << "seed " << seed;
  }
}

TEST(Sketch, CountSketchHasOneSignPerColumn) {
  const Mat I = identity(200);
  const DenseMatrix<double> S = sketch_rows(I.view(), 16, SketchKind::countsketch, 5);
  int plus = 0;
  std::vector<int> load(16, 0);
  for (index_t j = 0; j < 200; ++j) {
    int nonzero = 0;
    for (index_t i = 0; i < 16; ++i)
      if (S(i, j) != 0) {
        ++nonzero;
        EXPECT_EQ(std::fabs(S(i, j)), 1.0);
        plus += S(i, j) > 0;
        ++load[i];
      }
    EXPECT_EQ(nonzero, 1) << "column " << j;
  }
  EXPECT_GT(plus, 70);  // 100 +- 7 expected
  EXPECT_LT(plus, 130);
  for (int c : load) EXPECT_GT(c, 0);  // 12.5 per bucket expected
}

TEST(Sketch, GaussianEntriesHaveVarianceOneOverS) {
  const index_t n = 500, s = 50;
  const Mat I = identity(n);
  const DenseMatrix<double> S = sketch_rows(I.view(), s, SketchKind::gaussian, 12);
  double mean = 0, var = 0, kurt = 0;
  for (double x : S.data) mean += x;
  mean /= static_cast<double>(S.data.size());
  for (double x : S.data) {
    var += (x - mean) * (x - mean);
    kurt += std::pow(x - mean, 4);
  }
  var /= static_cast<double>(S.data.size() - 1);
  kurt /= static_cast<double>(S.data.size()) * var * var;
  // 25000 entries: sd of the mean 0.0009, relative sd of the variance 0.009, of the kurtosis ~0.03.
  EXPECT_NEAR(mean, 0.0, 0.005);
  EXPECT_NEAR(var * s, 1.0, 0.05);
  EXPECT_NEAR(kurt, 3.0, 0.2);  // normal, not uniform (1.8) or signs (1)
}

TEST(Sketch, RejectsBadInput) {
  Mat A = oracle::gaussian(12, 3, 1);
  for (SketchKind k : kKinds) {
    auto r = error_of([&] { sketch_rows(A.view(), 0, k, 1); });
    EXPECT_EQ(r.first, ErrorKind::invalid_argument);
    EXPECT_EQ(r.second.rfind("s: ", 0), 0u) << r.second;
    r = error_of([&] { sketch_rows(ConstMatrix{A.v.data(), 0, 3}, 4, k, 1); });
    EXPECT_EQ(r.first, ErrorKind::invalid_argument);
    EXPECT_EQ(r.second.rfind("matrix: ", 0), 0u) << r.second;
    r = error_of([&] { sketch_rows(static_cast<const double*>(nullptr), 0, 3, 3, 4, k, 1); });
    EXPECT_EQ(r.first, ErrorKind::invalid_argument);
    EXPECT_EQ(r.second.rfind("matrix: ", 0), 0u) << r.second;
  }
  // srht: s <= n' = 16 for n = 12; 16 itself is fine.
  EXPECT_NO_THROW(sketch_rows(A.view(), 16, SketchKind::srht, 1));
  auto r = error_of([&] { sketch_rows(A.view(), 17, SketchKind::srht, 1); });
  EXPECT_EQ(r.first, ErrorKind::invalid_argument);
  EXPECT_NE(r.second.find("s: expected s <= n' = 16"), std::string::npos) << r.second;
  EXPECT_NO_THROW(sketch_rows(A.view(), 100, SketchKind::gaussian, 1));  // s > n is allowed
  A(4, 2) = std::numeric_limits<float>::quiet_NaN();
  r = error_of([&] { sketch_rows(A.view(), 4, SketchKind::gaussian, 1); });
  EXPECT_EQ(r.first, ErrorKind::invalid_argument);
  EXPECT_NE(r.second.find("matrix: expected finite values"), std::string::npos) << r.second;
  EXPECT_NE(r.second.find("row 4, column 2"), std::string::npos) << r.second;
  std::vector<double> a(36, 1.0);
  a[7] = std::numeric_limits<double>::infinity();
  r = error_of([&] { sketch_rows(a.data(), 12, 3, 3, 4, SketchKind::countsketch, 1); });
  EXPECT_NE(r.second.find("row 2, column 1"), std::string::npos) << r.second;
  r = error_of([&] { sketch_rows(a.data(), 6, 3, 2, 4, SketchKind::countsketch, 1); });
  EXPECT_NE(r.second.find("leading dimension"), std::string::npos) << r.second;
}

TEST(SketchGram, EqualsTheGramOfTheSketch) {
  const std::vector<float> a = [] {
    std::mt19937_64 g(5);
    std::normal_distribution<float> nd;
    std::vector<float> v(3000 * 7);
    for (auto& x : v) x = nd(g);
    return v;
  }();
  const ConstMatrix A{a.data(), 3000, 7};
  for (SketchKind kind : {SketchKind::countsketch, SketchKind::srht, SketchKind::gaussian}) {
    const DenseMatrix<double> Y = sketch_rows(A, 2500, kind, 9);
    const std::vector<double> G = sketch_gram(A, 2500, kind, 9);
    ASSERT_EQ(G.size(), 49u);
    for (index_t i = 0; i < 7; ++i)
      for (index_t j = 0; j < 7; ++j) {
        double ref = 0;
        for (index_t r = 0; r < 2500; ++r) ref += Y(r, i) * Y(r, j);
        EXPECT_NEAR(G[i * 7 + j], ref, 1e-9 * std::max(1.0, std::fabs(ref))) << to_string(kind);
      }
    for (const auto& G1 : oracle::at_each_thread_count([&] { return sketch_gram(A, 2500, kind, 9); }))
      EXPECT_EQ(G1, G) << to_string(kind);
  }
  EXPECT_THROW(sketch_gram(A, 0, SketchKind::countsketch, 1), Error);
}
