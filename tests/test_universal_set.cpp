#include <gtest/gtest.h>

#include "cases.hpp"

using namespace levattn;
using oracle::Mat;

TEST(UniversalSet, ContainsEveryHeavyKeyForRandomAndWorstCaseQueries) {
  for (const auto& [name, K] : cases::key_matrices()) {
    const Mat Q = cases::stress_queries(K, 100, 7);
    for (double eps : {0.02, 0.1, 0.3, 0.5, 0.9, 1.0}) {
      const UniversalSet U = universal_set(K.view(), eps);
      std::vector<char> in(static_cast<std::size_t>(K.rows), 0);
      for (index_t j : U.indices) in[j] = 1;
      const auto heavy = oracle::heavy_x2(Q, K, eps);
      std::size_t missed = 0;
      for (const auto& e : heavy) missed += in[e.j] ? 0 : 1;
      EXPECT_EQ(missed, 0u) << name << " eps " << eps << ": recall must be exactly 1";
      EXPECT_LE(static_cast<double>(U.indices.size()), static_cast<double>(U.rank) / eps + 1e-9)
          << name << " eps " << eps;
      EXPECT_TRUE(std::is_sorted(U.indices.begin(), U.indices.end()));
      ASSERT_EQ(U.indices.size(), U.scores.size());
    }
  }
}

TEST(UniversalSet, IsExactlyTheKeysAtOrAboveEps) {
  const Mat K = oracle::gaussian(300, 6, 3);
  const LeverageScores s = leverage_scores(K.view());
  const std::vector<double> ref = oracle::leverage_svd(K);
  const UniversalSet U = universal_set(s, 0.03);
  std::vector<index_t> expected;
  for (index_t j = 0; j < 300; ++j)
    if (ref[j] >= 0.03 * (1 + 1e-3)) expected.push_back(j);
  // Every key clearly above the threshold is in, nothing clearly below is.
  for (index_t j : expected) EXPECT_TRUE(std::binary_search(U.indices.begin(), U.indices.end(), j));
  for (index_t j : U.indices) EXPECT_GE(ref[j], 0.03 * (1 - 1e-3));
  for (std::size_t a = 0; a < U.indices.size(); ++a) EXPECT_EQ(U.scores[a], s.scores[U.indices[a]]);
}

TEST(UniversalSet, PlantedKeysAreRecovered) {
  PlantedOptions o;
  o.n = 4096;
  o.d = 32;
  o.relevant = 6;
  o.seed = 5;
  const PlantedInstance p = planted(o);
  const UniversalSet U = universal_set(p.K.view(), 0.2);
  EXPECT_EQ(U.indices, p.relevant);
  const UniversalSet T = universal_set_top_k(leverage_scores(p.K.view()), 6);
  EXPECT_EQ(T.indices, p.relevant);
}

TEST(UniversalSet, TopKTakesLargestScoresWithTiesToLowerIndex) {
  // Keys 0..3 equal (score 1/4 each in their direction), key 4 alone in another (score 1).
  Mat K(6, 2);
  for (index_t i = 0; i < 4; ++i) K(i, 0) = 1;
  K(4, 1) = 1;
  K(5, 0) = 0.5f;  // score 0.25/4.25
  const LeverageScores s = leverage_scores(K.view());
  EXPECT_EQ(universal_set_top_k(s, 1).indices, (std::vector<index_t>{4}));
  EXPECT_EQ(universal_set_top_k(s, 3).indices, (std::vector<index_t>{0, 1, 4}));
  EXPECT_EQ(universal_set_top_k(s, 100).indices.size(), 6u);
}

TEST(UniversalSet, RejectsBadParameters) {
  const Mat K = oracle::gaussian(10, 3, 1);
  const LeverageScores s = leverage_scores(K.view());
  for (double eps : {0.0, -0.1, 1.5, std::nan("")}) {
    try {
      universal_set(s, eps);
      ADD_FAILURE() << "eps " << eps << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("eps"), std::string::npos);
    }
  }
  EXPECT_THROW(universal_set_top_k(s, 0), Error);
  EXPECT_NO_THROW(universal_set(s, 1.0));
}
