#include <gtest/gtest.h>
#include <omp.h>

#include <numeric>

#include "cases.hpp"
#include "detail/lapack.hpp"

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

TEST(LeverageScores, FullRowRankAmongNonzeroRowsIsExactlyOne) {
  // 7 independent keys in d = 8 with 3 zero rows between them (masked keys are passed zeroed):
  // every nonzero key scores exactly 1 and every zero key exactly 0, as without the zero rows,
  // so top-k ties break by index the same way with and without them.
  const Mat G = oracle::gaussian(7, 8, 21);
  Mat K(10, 8);
  const index_t rows[] = {0, 2, 3, 5, 6, 8, 9};
  for (index_t r = 0; r < 7; ++r)
    for (index_t c = 0; c < 8; ++c) K(rows[r], c) = G(r, c);
  const LeverageScores s = leverage_scores(K.view());
  EXPECT_EQ(s.rank, 7);
  for (index_t j = 0; j < 10; ++j) EXPECT_EQ(s.scores[j], (j == 1 || j == 4 || j == 7) ? 0.0 : 1.0) << j;
  const LeverageScores alone = leverage_scores(G.view());
  for (double v : alone.scores) EXPECT_EQ(v, 1.0);
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
    const Mat KR = oracle::product(K, R);
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

// Scores of other rows against a given Gram: d of them have full row rank among themselves, which
// must not be mistaken for the Gram's rows having full rank (their scores are not 1).
TEST(LeverageScores, OtherRowsAgainstAGivenGram) {
  const Mat K = oracle::gaussian(200, 8, 12);
  const KeyGram g = key_gram(K.view());
  const LeverageScores all = leverage_scores(K.view());
  for (index_t rows : {1, 8, 50}) {
    const ConstMatrix first{K.v.data(), rows, 8};
    const LeverageScores part = leverage_scores(first, g);
    ASSERT_EQ(part.scores.size(), static_cast<std::size_t>(rows));
    for (index_t j = 0; j < rows; ++j) EXPECT_NEAR(part.scores[j], all.scores[j], 1e-6) << rows << " " << j;
  }
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
  EXPECT_LT(s.rel_error_bound, 1e-4);  // the float32 pass would be bounded by ~1e-2 here
  expect_matches_oracle(K, s, "cond 1e4");
}

TEST(LeverageScores, SameResultForEveryThreadCount) {
  for (index_t d : {16, 5}) {  // Cholesky and, rank-deficient, eigenvector factors
    const Mat K = d == 16 ? oracle::gaussian(20000, 16, 21)
                          : oracle::product(oracle::gaussian(20000, 3, 22), oracle::gaussian(3, 5, 23));
    const auto runs = oracle::at_each_thread_count([&] { return leverage_scores(K.view()).scores; });
    for (const auto& r : runs) EXPECT_EQ(r, runs[0]) << d;  // bit for bit
  }
}

TEST(LeverageScores, RejectsBadInput) {
  Mat K = oracle::gaussian(10, 3, 1);
  const auto kind_of = oracle::error_of;
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

namespace {

// Keys on which the sketched scores are checked: random, planted, heavy-tailed; n >> s.
std::vector<std::pair<std::string, Mat>> sketch_cases() {
  std::vector<std::pair<std::string, Mat>> out;
  out.emplace_back("random", oracle::gaussian(12000, 8, 61));
  PlantedOptions po;
  po.n = 12000;
  po.d = 8;
  po.relevant = 4;
  po.seed = 62;
  const PlantedInstance p = planted(po);
  Mat P(12000, 8);
  P.v = p.K.data;
  out.emplace_back("planted", P);
  out.emplace_back("heavy_tailed", cases::heavy_tailed(12000, 8, 63));
  return out;
}

}  // namespace

TEST(SketchedScores, WithinStatedGammaForEverySketch) {
  for (const auto& [name, K] : sketch_cases()) {
    const LeverageScores exact = leverage_scores(K.view());
    for (SketchKind kind : {SketchKind::countsketch, SketchKind::srht, SketchKind::gaussian}) {
      {
        const index_t jl = 0;
        LeverageOptions o;
        o.method = ScoreMethod::sketch;
        o.sketch = kind;
        o.gamma = 0.5;
        o.jl_columns = jl;
        o.seed = 7;
        const LeverageScores s = leverage_scores(K.view(), o);
        const std::string what = name + " " + to_string(kind) + " jl " + std::to_string(jl);
        ASSERT_EQ(s.method, ScoreMethod::sketch) << what;
        EXPECT_GT(s.sketch_size, 0) << what;
        EXPECT_LT(s.sketch_size, K.rows) << what;
        EXPECT_LE(s.rel_error_bound, 0.5 * 1.001) << what;  // the target it was sized for
        EXPECT_EQ(s.rank, 8) << what;
        double worst = 0;
        for (index_t j = 0; j < K.rows; ++j) {
          const double ratio = s.scores[j] / exact.scores[j];
          worst = std::max({worst, ratio - 1, 1 / ratio - 1});
        }
        EXPECT_LE(worst, s.rel_error_bound) << what;
        EXPECT_GT(worst, 1e-4) << what << ": a sketch cannot be this exact";
        // The universal set from sketched scores contains the exact one.
        for (double eps : {0.001, 0.01, 0.2}) {
          const UniversalSet a = universal_set(exact, eps), b = universal_set(s, eps);
          EXPECT_TRUE(std::includes(b.indices.begin(), b.indices.end(), a.indices.begin(), a.indices.end()))
              << what << " eps " << eps;
        }
      }
    }
  }
}

TEST(SketchedScores, JlCompressionIsUnbiasedAndStatesItsBound) {
  const Mat K = oracle::gaussian(12000, 32, 91);
  const LeverageScores exact = leverage_scores(K.view());
  LeverageOptions o;
  o.method = ScoreMethod::sketch;
  o.gamma = 0.5;
  o.jl_columns = 16;
  const LeverageScores s = leverage_scores(K.view(), o);
  // 16 JL columns over 12000 rows carry no uniform guarantee: the stated bound says so.
  EXPECT_TRUE(std::isinf(s.rel_error_bound));
  // Unbiased against the same sketch's scores without JL: E ||x^T G||^2 / t = ||x||^2. For one G
  // the mean ratio over many rows has standard deviation about sqrt(2 / (t rank)) = 0.06, so it
  // is averaged over 8 seeds (sd 0.022) and checked within 4 sd.
  double mean = 0;
  for (std::uint64_t seed = 0; seed < 8; ++seed) {
    LeverageOptions jl = o, plain = o;
    jl.seed = plain.seed = seed;
    plain.jl_columns = 0;
    const LeverageScores a = leverage_scores(K.view(), jl), b = leverage_scores(K.view(), plain);
    for (index_t j = 0; j < K.rows; ++j) mean += a.scores[j] / b.scores[j];
  }
  mean /= 8.0 * static_cast<double>(K.rows);
  EXPECT_NEAR(mean, 1.0, 0.09);
  EXPECT_GT(exact.rank, 0);
  // Without JL the same sketch is far more accurate.
  o.jl_columns = 0;
  const LeverageScores t = leverage_scores(K.view(), o);
  EXPECT_LE(t.rel_error_bound, 0.5 * 1.001);
}

TEST(SketchedScores, ReproducibleAndThreadCountIndependent) {
  const Mat K = oracle::gaussian(30000, 6, 71);
  for (SketchKind kind : {SketchKind::countsketch, SketchKind::srht, SketchKind::gaussian}) {
    LeverageOptions o;
    o.method = ScoreMethod::sketch;
    o.sketch = kind;
    o.gamma = 0.5;
    o.seed = 3;
    const LeverageScores a = leverage_scores(K.view(), o);
    for (const auto& r : oracle::at_each_thread_count([&] { return leverage_scores(K.view(), o).scores; }))
      EXPECT_EQ(r, a.scores) << to_string(kind);
    o.seed = 4;
    EXPECT_NE(leverage_scores(K.view(), o).scores, a.scores) << to_string(kind);
  }
}

TEST(SketchedScores, RankDeficientAndSmallInputs) {
  // Rank 3 in dimension 6: scores sum to 3 (to the sketch's accuracy) and zero keys score 0.
  Mat K = oracle::product(oracle::gaussian(20000, 3, 81), oracle::gaussian(3, 6, 82));
  for (index_t i = 0; i < 20000; i += 100)
    for (index_t j = 0; j < 6; ++j) K(i, j) = 0.0f;
  LeverageOptions o;
  o.method = ScoreMethod::sketch;
  o.gamma = 0.5;
  const LeverageScores s = leverage_scores(K.view(), o);
  EXPECT_EQ(s.rank, 3);
  EXPECT_EQ(s.scores[0], 0.0);
  double sum = 0;
  for (double x : s.scores) sum += x;
  EXPECT_NEAR(sum, 3.0, 3.0 * s.rel_error_bound);
  // A sketch no smaller than K: the exact method is used.
  const Mat small = oracle::gaussian(50, 4, 83);
  const LeverageScores e = leverage_scores(small.view(), o);
  EXPECT_EQ(e.method, ScoreMethod::exact);
  expect_matches_oracle(small, e, "small");
}

TEST(SketchedScores, RejectsBadOptions) {
  const Mat K = oracle::gaussian(100, 3, 1);
  LeverageOptions o;
  o.method = ScoreMethod::sketch;
  o.gamma = 1.0;
  EXPECT_THROW(leverage_scores(K.view(), o), Error);
  o.gamma = 0.2;
  o.delta = 0;
  EXPECT_THROW(leverage_scores(K.view(), o), Error);
  o.delta = 0.01;
  o.ridge = 1;
  EXPECT_THROW(leverage_scores(K.view(), o), Error);
  o.ridge = 0;
  o.sketch_size = -1;
  EXPECT_THROW(leverage_scores(K.view(), o), Error);
  // A non-finite key is found while sketching and named.
  o.sketch_size = 20;
  Mat bad = K;
  bad(37, 1) = std::numeric_limits<float>::infinity();
  for (SketchKind kind : {SketchKind::countsketch, SketchKind::srht, SketchKind::gaussian}) {
    o.sketch = kind;
    try {
      leverage_scores(bad.view(), o);
      ADD_FAILURE() << to_string(kind);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      EXPECT_NE(std::string(e.what()).find("keys: expected finite values, found inf at row 37, column 1"),
                std::string::npos) << e.what();
    }
  }
}

// inverse_cholesky (plain loops up to order 32, LAPACK above): X = L^-1 is lower triangular with a
// positive diagonal and whitens a (X a X^T = I), the oracle of the unique Cholesky factor; a
// matrix that is not positive definite is refused.
TEST(InverseCholesky, WhitensOnBothPathsAndRefusesIndefiniteMatrices) {
  std::mt19937_64 g(12);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (index_t r : {1, 2, 5, 16, 31, 32, 33, 48}) {
    std::vector<double> y(static_cast<std::size_t>(3 * r * r)), a(static_cast<std::size_t>(r * r), 0.0);
    for (double& e : y) e = nd(g);
    for (index_t i = 0; i < r; ++i)  // a = Y^T Y + I / 10: positive definite, condition ~ 1e2
      for (index_t j = 0; j < r; ++j) {
        for (index_t t = 0; t < 3 * r; ++t) a[i * r + j] += y[t * r + i] * y[t * r + j];
        a[i * r + j] += i == j ? 0.1 : 0.0;
      }
    std::vector<double> x = a;
    ASSERT_TRUE(detail::inverse_cholesky(x, r)) << "r " << r;
    for (index_t i = 0; i < r; ++i) EXPECT_GT(x[i * r + i], 0.0) << "r " << r;
    double worst = 0.0;
    for (index_t i = 0; i < r; ++i)
      for (index_t j = 0; j < r; ++j) {
        double s = 0.0;  // (X a X^T)_ij over the lower triangles of X
        for (index_t p = 0; p <= i; ++p)
          for (index_t q = 0; q <= j; ++q) s += x[i * r + p] * a[p * r + q] * x[j * r + q];
        worst = std::max(worst, std::fabs(s - (i == j ? 1.0 : 0.0)));
      }
    EXPECT_LT(worst, 1e-10) << "r " << r;
    std::vector<double> indefinite = a;
    indefinite[(r / 2) * r + r / 2] = -1.0;  // a negative diagonal entry: not positive definite
    EXPECT_FALSE(detail::inverse_cholesky(indefinite, r)) << "r " << r;
    std::vector<double> zero(a.size(), 0.0);
    EXPECT_FALSE(detail::inverse_cholesky(zero, r)) << "r " << r;
  }
}
