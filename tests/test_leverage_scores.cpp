#include <gtest/gtest.h>
#include <omp.h>

#include <numeric>

#include "cases.hpp"

using namespace levattn;
using oracle::Mat;

namespace {

double sum(const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); }

// Scores agree with the SVD oracle within the proven bound (plus float64 noise of the oracle).
void expect_matches_oracle(const Mat& K, const LeverageScores& s, const std::string& name,
                           double ridge = 0.0) {
  index_t rank = 0;
  const std::vector<double> ref = oracle::leverage_svd(K, 1e-5, ridge, &rank);
  EXPECT_EQ(s.rank, rank) << name;
  ASSERT_EQ(s.scores.size(), ref.size()) << name;
  for (std::size_t j = 0; j < ref.size(); ++j) {
    EXPECT_NEAR(s.scores[j], ref[j], std::max(s.rel_error_bound, 1e-9) * ref[j] + 1e-9)
        << name << " key " << j;
    EXPECT_GE(s.scores[j], 0.0);
    EXPECT_LE(s.scores[j], 1.0);
  }
}

}  // namespace

TEST(LeverageScores, MatchSvdOracleOnEveryCase) {
  for (const auto& [name, K] : cases::key_matrices()) {
    const LeverageScores s = leverage_scores(K.view());
    expect_matches_oracle(K, s, name);
    EXPECT_LE(s.rel_error_bound, 1e-4) << name;
  }
}

TEST(LeverageScores, SumToTheRank) {
  const std::vector<std::pair<std::string, index_t>> expected = {
      {"random", 8}, {"planted", 8}, {"rank_deficient", 4}, {"duplicates", 6},
      {"zero_keys", 5}, {"n_less_than_d", 5}, {"condition_1e4", 6}, {"heavy_tailed", 6}};
  const auto mats = cases::key_matrices();
  for (std::size_t c = 0; c < mats.size(); ++c) {
    const LeverageScores s = leverage_scores(mats[c].second.view());
    EXPECT_EQ(mats[c].first, expected[c].first);
    EXPECT_EQ(s.rank, expected[c].second) << mats[c].first;
    EXPECT_NEAR(sum(s.scores), static_cast<double>(s.rank), 1e-4 * static_cast<double>(s.rank))
        << mats[c].first;
  }
}

TEST(LeverageScores, ClosedFormCases) {
  // Orthonormal rows of the identity: every score 1. A zero key: score 0. Two equal keys: 1/2.
  Mat K(5, 3);
  K(0, 0) = 1;
  K(1, 1) = 2;
  K(2, 2) = -3;
  K(4, 2) = -3;  // duplicate of key 2 up to sign
  const LeverageScores s = leverage_scores(K.view());
  EXPECT_NEAR(s.scores[0], 1.0, 1e-6);
  EXPECT_NEAR(s.scores[1], 1.0, 1e-6);
  EXPECT_NEAR(s.scores[2], 0.5, 1e-6);
  EXPECT_NEAR(s.scores[3], 0.0, 1e-12);
  EXPECT_NEAR(s.scores[4], 0.5, 1e-6);
  EXPECT_EQ(s.rank, 3);
  // All-zero K: rank 0, every score 0.
  const Mat Z(4, 3);
  const LeverageScores z = leverage_scores(Z.view());
  EXPECT_EQ(z.rank, 0);
  for (double v : z.scores) EXPECT_EQ(v, 0.0);
}

TEST(LeverageScores, WorstCaseQueryAttainsTheScore) {
  for (const auto& [name, K] : cases::key_matrices()) {
    const LeverageScores s = leverage_scores(K.view());
    const Mat Q = cases::stress_queries(K, 0, 1);
    for (index_t j = 0; j < K.rows; ++j) {
      double z = 0, own = oracle::dot(Q, j, K, j);
      for (index_t l = 0; l < K.rows; ++l) z += std::pow(oracle::dot(Q, j, K, l), 2);
      if (z == 0) {  // zero key: q = 0
        EXPECT_NEAR(s.scores[j], 0.0, 1e-9) << name;
        continue;
      }
      EXPECT_NEAR(own * own / z, s.scores[j], 2e-4 * s.scores[j] + 1e-6) << name << " key " << j;
    }
  }
}

TEST(LeverageScores, InvariantUnderInvertibleRightFactor) {
  for (const auto& [name, K] : cases::key_matrices()) {
    if (name == "condition_1e4" || name == "heavy_tailed") continue;  // K R loses digits in float32
    const index_t d = K.cols;
    Mat R = oracle::gaussian(d, d, 99);
    for (index_t i = 0; i < d; ++i) R(i, i) += 3.0f;  // well conditioned
    Mat KR(K.rows, d);
    for (index_t i = 0; i < K.rows; ++i)
      for (index_t j = 0; j < d; ++j) {
        double acc = 0;
        for (index_t c = 0; c < d; ++c) acc += static_cast<double>(K(i, c)) * R(c, j);
        KR(i, j) = static_cast<float>(acc);
      }
    const LeverageScores a = leverage_scores(K.view()), b = leverage_scores(KR.view());
    EXPECT_EQ(a.rank, b.rank) << name;
    for (index_t j = 0; j < K.rows; ++j) EXPECT_NEAR(a.scores[j], b.scores[j], 1e-4) << name << " key " << j;
  }
}

TEST(LeverageScores, PermuteWithTheRows) {
  const Mat K = oracle::gaussian(97, 7, 5);
  std::vector<index_t> perm(97);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(3));
  Mat P(97, 7);
  for (index_t i = 0; i < 97; ++i)
    for (index_t j = 0; j < 7; ++j) P(i, j) = K(perm[i], j);
  const LeverageScores a = leverage_scores(K.view()), b = leverage_scores(P.view());
  for (index_t i = 0; i < 97; ++i) EXPECT_NEAR(b.scores[i], a.scores[perm[i]], 1e-6);
}

TEST(LeverageScores, RidgeMatchesOracle) {
  const Mat K = oracle::gaussian(64, 6, 8);
  for (double ridge : {0.1, 10.0, 1000.0}) {
    LeverageOptions o;
    o.ridge = ridge;
    const LeverageScores s = leverage_scores(K.view(), o);
    const std::vector<double> ref = oracle::leverage_svd(K, 1e-5, ridge);
    for (index_t j = 0; j < 64; ++j) EXPECT_NEAR(s.scores[j], ref[j], 1e-5 * ref[j] + 1e-9);
    EXPECT_LT(sum(s.scores), 6.0);
  }
}

TEST(LeverageScores, IllConditionedUsesFloat64Pass) {
  const Mat K = cases::conditioned(100, 8, 1e4, 4);
  const LeverageScores s = leverage_scores(K.view());
  EXPECT_LT(s.rel_error_bound, 1e-9);  // float32 pass would be bounded by ~1e-2 here
  expect_matches_oracle(K, s, "cond 1e4");
}

TEST(LeverageScores, SameResultForOneAndTwoThreads) {
  const Mat K = oracle::gaussian(20000, 16, 21);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const LeverageScores a = leverage_scores(K.view());
  omp_set_num_threads(2);
  const LeverageScores b = leverage_scores(K.view());
  omp_set_num_threads(saved);
  EXPECT_EQ(a.scores, b.scores);  // bit for bit
}

TEST(LeverageScores, RejectsBadInput) {
  Mat K = oracle::gaussian(10, 3, 1);
  const auto kind_of = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::make_pair(e.kind(), std::string(e.what()));
    }
    return std::make_pair(ErrorKind::internal, std::string("no error"));
  };
  auto r = kind_of([&] { leverage_scores(ConstMatrix{K.v.data(), 0, 3}); });
  EXPECT_EQ(r.first, ErrorKind::invalid_argument);
  EXPECT_NE(r.second.find("keys"), std::string::npos);
  K(4, 2) = std::numeric_limits<float>::quiet_NaN();
  r = kind_of([&] { leverage_scores(K.view()); });
  EXPECT_EQ(r.first, ErrorKind::invalid_argument);
  EXPECT_NE(r.second.find("row 4, column 2"), std::string::npos) << r.second;
  K(4, 2) = std::numeric_limits<float>::infinity();
  EXPECT_THROW(leverage_scores(K.view()), Error);
  K(4, 2) = 1;
  LeverageOptions o;
  o.ridge = -1;
  r = kind_of([&] { leverage_scores(K.view(), o); });
  EXPECT_NE(r.second.find("ridge"), std::string::npos);
  o.ridge = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW(leverage_scores(K.view(), o), Error);
  o.ridge = 0;
  o.rank_rtol = 1.5;
  EXPECT_THROW(leverage_scores(K.view(), o), Error);
}
