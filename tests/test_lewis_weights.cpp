#include <gtest/gtest.h>

#include <numeric>

#include "cases.hpp"

using namespace levattn;
using oracle::Mat;

namespace {

LewisWeights weights(const Mat& K, double p) {
  LewisOptions o;
  o.p = p;
  return lewis_weights(K.view(), o);
}

// Small matrices for the exact-sensitivity oracle (n <= 40, d <= 4).
std::vector<std::pair<std::string, Mat>> small_matrices() {
  std::vector<std::pair<std::string, Mat>> out;
  out.emplace_back("random 30x3", oracle::gaussian(30, 3, 1));
  {
    Mat K = oracle::gaussian(40, 4, 2, 0.2);
    for (index_t j = 0; j < 4; ++j) K(7, j) = j == 0 ? 3.0f : 0.0f;  // one outlying key
    for (index_t j = 0; j < 4; ++j) K(21, j) = j == 1 ? -2.0f : 0.5f;
    out.emplace_back("planted 40x4", K);
  }
  {
    Mat K = oracle::gaussian(24, 3, 3);
    for (index_t j = 0; j < 3; ++j) K(5, j) = K(4, j);  // a duplicate
    for (index_t j = 0; j < 3; ++j) K(9, j) = 0;        // a zero key
    out.emplace_back("duplicate and zero 24x3", K);
  }
  {
    Mat K = oracle::gaussian(20, 2, 4);
    for (index_t i = 0; i < 20; ++i) {
      const float s = static_cast<float>(1.0 + 10.0 * ((i * 7) % 5 == 0));
      K(i, 0) *= s;
      K(i, 1) *= s;
    }
    out.emplace_back("heavy-tailed 20x2", K);
  }
  return out;
}

}  // namespace

TEST(LewisWeights, FixedPointResidualAndSumOnEveryCase) {
  for (const auto& [name, K] : cases::key_matrices()) {
    for (double p : {0.5, 1.0, 1.5, 3.0, 4.0, 6.0, 8.0}) {
      const LewisWeights w = weights(K, p);
      EXPECT_TRUE(w.converged) << name << " p " << p << " after " << w.iterations;
      EXPECT_LT(w.residual, 1e-6) << name << " p " << p;
      const double sum = std::accumulate(w.weights.begin(), w.weights.end(), 0.0);
      EXPECT_NEAR(sum, static_cast<double>(w.rank), 1e-6 * static_cast<double>(w.rank) + 1e-9)
          << name << " p " << p;
      for (double x : w.weights) {
        EXPECT_GE(x, 0.0);
        EXPECT_LE(x, 1.0);
      }
    }
  }
}

TEST(LewisWeights, PEqualsTwoGivesLeverageScores) {
  for (const auto& [name, K] : cases::key_matrices()) {
    const LewisWeights w = weights(K, 2.0);
    const LeverageScores s = leverage_scores(K.view());
    ASSERT_EQ(w.rank, s.rank) << name;
    for (std::size_t j = 0; j < s.scores.size(); ++j) EXPECT_NEAR(w.weights[j], s.scores[j], 1e-6) << name;
    EXPECT_LE(w.iterations, 1) << name;
  }
}

TEST(LewisWeights, ClosedFormOrthogonalKeys) {
  // Keys along orthogonal axes, two with equal norm on axis 0: w = 1/2, 1/2, 1 for every p
  // (W^(1-2/p) scales equal keys equally; the fixed point splits the axis evenly).
  Mat K(3, 2);
  K(0, 0) = 2;
  K(1, 0) = 2;
  K(2, 1) = 5;
  for (double p : {1.0, 3.0, 6.0}) {
    const LewisWeights w = weights(K, p);
    EXPECT_NEAR(w.weights[0], 0.5, 1e-9);
    EXPECT_NEAR(w.weights[1], 0.5, 1e-9);
    EXPECT_NEAR(w.weights[2], 1.0, 1e-9);
  }
}

TEST(LewisWeights, InvariantUnderInvertibleRightFactor) {
  const Mat K = oracle::gaussian(150, 5, 31);
  Mat R = oracle::gaussian(5, 5, 32);
  for (index_t i = 0; i < 5; ++i) R(i, i) += 3.0f;
  const Mat KR = oracle::product(K, R);
  for (double p : {1.0, 3.0, 6.0}) {
    const LewisWeights a = weights(K, p), b = weights(KR, p);
    for (index_t j = 0; j < 150; ++j) EXPECT_NEAR(a.weights[j], b.weights[j], 1e-5) << "p " << p;
  }
}

TEST(SensitivityBounds, OracleAgreesWithLeverageAtPEqualsTwo) {
  // Validates the convex-program oracle itself: for p = 2 it must give the leverage scores.
  const Mat K = oracle::gaussian(25, 3, 41);
  const LeverageScores s = leverage_scores(K.view());
  for (index_t j = 0; j < 25; ++j) EXPECT_NEAR(oracle::exact_sensitivity(K, j, 2.0), s.scores[j], 1e-7);
}

TEST(SensitivityBounds, NeverBelowExactSensitivitiesAndUniversalSetContainsHeavyKeys) {
  for (const auto& [name, K] : small_matrices()) {
    for (double p : {1.0, 1.5, 3.0, 4.0, 6.0}) {
      const LeverageScores t = sensitivity_bounds(K.view(), p);
      double total = 0;
      for (double x : t.scores) total += x;
      EXPECT_LE(total, std::pow(static_cast<double>(t.rank), std::max(1.0, p / 2)) + 1e-9) << name << " p " << p;
      std::vector<double> s(static_cast<std::size_t>(K.rows));
      for (index_t j = 0; j < K.rows; ++j) {
        s[j] = oracle::exact_sensitivity(K, j, p);
        EXPECT_GE(t.scores[j], s[j] * (1 - 1e-6) - 1e-12) << name << " p " << p << " key " << j;
      }
      for (double eps : {0.05, 0.2, 0.5}) {
        const UniversalSet U = universal_set(t, eps);
        for (index_t j = 0; j < K.rows; ++j)
          if (s[j] >= eps) {
            EXPECT_TRUE(std::binary_search(U.indices.begin(), U.indices.end(), j))
                << name << " p " << p << " eps " << eps << " key " << j;
          }
        EXPECT_LE(static_cast<double>(U.indices.size()),
                  std::pow(static_cast<double>(t.rank), std::max(1.0, p / 2)) / eps + 1e-9);
      }
    }
  }
}

TEST(LewisWeights, RejectsBadInput) {
  const Mat K = oracle::gaussian(10, 3, 1);
  for (double p : {0.0, -1.0, std::nan(""), static_cast<double>(INFINITY)}) {
    try {
      weights(K, p);
      ADD_FAILURE() << "p " << p;
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("p:"), std::string::npos);
    }
  }
  Mat bad = K;
  bad(2, 2) = std::nanf("");
  EXPECT_THROW(weights(bad, 3.0), Error);
}
