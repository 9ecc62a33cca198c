#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <map>
#include <set>

#include "cases.hpp"

using namespace levattn;
using oracle::Mat;

namespace {

void expect_same(const HeavyEntries& got, const std::vector<oracle::Entry>& ref, const std::string& what) {
  ASSERT_EQ(got.entries.size(), ref.size()) << what;
  for (std::size_t a = 0; a < ref.size(); ++a) {
    EXPECT_EQ(got.entries[a].query, ref[a].i) << what;
    EXPECT_EQ(got.entries[a].key, ref[a].j) << what;
    EXPECT_NEAR(got.entries[a].value, ref[a].a, 1e-4 * ref[a].a) << what;
  }
}

}  // namespace

TEST(HeavyEntries, EqualBruteForceOnEveryCase) {
  for (const auto& [name, K] : cases::key_matrices()) {
    const Mat Q = cases::stress_queries(K, 150, 9);
    for (double eps : {0.05, 0.25, 0.6}) {
      const HeavyEntries h = heavy_entries(Q.view(), K.view(), eps);
      // Worst-case queries sit exactly at A_ij = tau_j; keep the comparison off the knife edge
      // by checking against the oracle at eps and confirming entries near eps are consistent.
      std::vector<oracle::Entry> ref = oracle::heavy_x2(Q, K, eps);
      std::vector<oracle::Entry> firm;
      for (const auto& e : ref)
        if (e.a >= eps * (1 + 1e-5)) firm.push_back(e);
      std::vector<oracle::Entry> got_firm;
      for (const auto& e : h.entries) {
        EXPECT_GE(e.value, eps);
        if (e.value >= eps * (1 + 1e-5)) got_firm.push_back({e.query, e.key, e.value});
      }
      HeavyEntries g;
      for (const auto& e : got_firm) g.entries.push_back({e.i, e.j, e.a});
      expect_same(g, firm, name + " eps " + std::to_string(eps));
      EXPECT_LE(h.universal_size, static_cast<index_t>(static_cast<double>(h.rank) / eps + 1e-9));
    }
  }
}

TEST(HeavyEntries, ExactOnRandomQueriesAndPlantedModel) {
  PlantedOptions o;
  o.n = 2000;
  o.d = 16;
  o.relevant = 5;
  o.seed = 2;
  const PlantedInstance p = planted(o);
  Mat Q(p.Q.rows, p.Q.cols), K(p.K.rows, p.K.cols);
  Q.v = p.Q.data;
  K.v = p.K.data;
  const HeavyEntries h = heavy_entries(Q.view(), K.view(), 0.1);
  expect_same(h, oracle::heavy_x2(Q, K, 0.1), "planted");
  // Each query's planted key is heavy for it.
  std::set<std::pair<index_t, index_t>> found;
  for (const auto& e : h.entries) found.insert({e.query, e.key});
  for (index_t i = 0; i < 2000; ++i) EXPECT_TRUE(found.count({i, p.query_target[i]})) << "query " << i;
}

TEST(HeavyEntries, LibraryBruteForceAgreesWithOracle) {
  const Mat K = oracle::gaussian(150, 5, 4), Q = oracle::gaussian(80, 5, 6);
  expect_same(heavy_entries_brute_force(Q.view(), K.view(), 0.05), oracle::heavy_x2(Q, K, 0.05), "brute force");
}

TEST(HeavyEntries, ZeroNormaliserRowsAreReportedNotDivided) {
  // Keys span the first two coordinates only; query 1 is zero, query 2 is orthogonal to all keys.
  Mat K = oracle::gaussian(30, 3, 2);
  for (index_t i = 0; i < 30; ++i) K(i, 2) = 0;
  Mat Q = oracle::gaussian(4, 3, 3);
  for (index_t j = 0; j < 3; ++j) Q(1, j) = 0;
  Q(2, 0) = Q(2, 1) = 0;
  Q(2, 2) = 5;
  const HeavyEntries h = heavy_entries(Q.view(), K.view(), 0.01);
  EXPECT_EQ(h.zero_rows, (std::vector<index_t>{1, 2}));
  for (const auto& e : h.entries) {
    EXPECT_NE(e.query, 1);
    EXPECT_NE(e.query, 2);
    EXPECT_TRUE(std::isfinite(e.value));
  }
  std::vector<index_t> zero;
  expect_same(h, oracle::heavy_x2(Q, K, 0.01, &zero), "zero rows");
  EXPECT_EQ(zero, h.zero_rows);
}

TEST(HeavyEntries, RejectsBadInput) {
  const Mat K = oracle::gaussian(10, 3, 1), Q = oracle::gaussian(5, 4, 2);
  EXPECT_THROW(heavy_entries(Q.view(), K.view(), 0.1), Error);  // d differs
  const Mat Q3 = oracle::gaussian(5, 3, 2);
  EXPECT_THROW(heavy_entries(Q3.view(), K.view(), 0.0), Error);
  EXPECT_THROW(heavy_entries(Q3.view(), K.view(), 1.01), Error);
  Mat bad = Q3;
  bad(0, 0) = std::numeric_limits<float>::infinity();
  try {
    heavy_entries(bad.view(), K.view(), 0.1);
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("queries"), std::string::npos);
  }
  EXPECT_THROW(heavy_entries(ConstMatrix{Q3.v.data(), 0, 3}, K.view(), 0.1), Error);
}

TEST(HeavyEntriesPower, ExactNormaliserEqualsBruteForce) {
  for (const auto& [name, K] : cases::key_matrices()) {
    if (K.rows * K.cols > 2000) continue;
    const Mat Q = cases::stress_queries(K, 60, 13);
    for (double p : {1.0, 1.5, 3.0, 4.0}) {
      HeavyOptions o;
      o.p = p;
      const double eps = 0.2;
      const HeavyEntries h = heavy_entries(Q.view(), K.view(), eps, o);
      EXPECT_EQ(h.normaliser, "exact (all keys)");
      std::vector<oracle::Entry> firm;
      for (const auto& e : oracle::heavy_power(Q, K, eps, p))
        if (e.a >= eps * (1 + 1e-5)) firm.push_back(e);
      HeavyEntries g;
      for (const auto& e : h.entries)
        if (e.value >= eps * (1 + 1e-5)) g.entries.push_back(e);
      expect_same(g, firm, name + " p " + std::to_string(p));
    }
  }
}

TEST(HeavyEntriesPower, PEqualsTwoMatchesQuadraticForm) {
  const Mat K = oracle::gaussian(300, 6, 4), Q = oracle::gaussian(100, 6, 5);
  HeavyOptions o;
  const HeavyEntries a = heavy_entries(Q.view(), K.view(), 0.05, o);
  EXPECT_EQ(a.normaliser, "exact (||R q||^2, K = QR)");
  expect_same(a, oracle::heavy_power(Q, K, 0.05, 2.0), "p = 2");
}

TEST(HeavyEntriesPower, SampledNormaliserIsWithinGammaAndFindsEveryHeavyEntry) {
  // Keys: Gaussian noise plus a few strong keys, so there are heavy entries for |x|^3.
  Mat K = oracle::gaussian(20000, 4, 21, 0.3);
  for (index_t r = 0; r < 4; ++r)
    for (index_t j = 0; j < 4; ++j) K(1000 * r + 7, j) = j == r ? 6.0f : 0.0f;
  const Mat Q = oracle::gaussian(200, 4, 22);
  const double eps = 0.05, p = 3.0;
  HeavyOptions o;
  o.p = p;
  o.normaliser = Normaliser::sampled;
  o.gamma = 0.3;
  o.seed = 5;
  const HeavyEntries h = heavy_entries(Q.view(), K.view(), eps, o);
  ASSERT_EQ(h.normaliser, "sampled");
  EXPECT_GT(h.samples, 0);
  EXPECT_LT(h.samples, 20000);
  EXPECT_LE(h.gamma, 0.3 + 1e-12);
  const auto truth = oracle::heavy_power(Q, K, eps, p);
  ASSERT_FALSE(truth.empty());
  std::map<std::pair<index_t, index_t>, double> got;
  for (const auto& e : h.entries) got[{e.query, e.key}] = e.value;
  for (const auto& e : truth) {
    const auto it = got.find({e.i, e.j});
    ASSERT_NE(it, got.end()) << "missed heavy entry (" << e.i << ", " << e.j << ")";
    EXPECT_GE(it->second, e.a / (1 + h.gamma));
    EXPECT_LE(it->second, e.a / (1 - h.gamma));
  }
  // Every reported entry is at least eps (1 - gamma) / (1 + gamma) heavy in truth.
  const auto loose = oracle::heavy_power(Q, K, eps * (1 - h.gamma) / (1 + h.gamma) * 0.999, p);
  std::set<std::pair<index_t, index_t>> ok;
  for (const auto& e : loose) ok.insert({e.i, e.j});
  for (const auto& e : h.entries) EXPECT_TRUE(ok.count({e.query, e.key}));
  // Reproducible by seed.
  const HeavyEntries again = heavy_entries(Q.view(), K.view(), eps, o);
  ASSERT_EQ(again.entries.size(), h.entries.size());
  for (std::size_t a = 0; a < h.entries.size(); ++a) EXPECT_EQ(again.entries[a].value, h.entries[a].value);
}

TEST(HeavyEntriesPower, RejectsBadOptions) {
  const Mat K = oracle::gaussian(50, 3, 1), Q = oracle::gaussian(5, 3, 2);
  HeavyOptions o;
  o.p = 0;
  EXPECT_THROW(heavy_entries(Q.view(), K.view(), 0.1, o), Error);
  o.p = 3;
  o.normaliser = Normaliser::sampled;
  o.gamma = 1.5;
  EXPECT_THROW(heavy_entries(Q.view(), K.view(), 0.1, o), Error);
  o.gamma = 0.2;
  o.delta = 0;
  EXPECT_THROW(heavy_entries(Q.view(), K.view(), 0.1, o), Error);
  o.delta = 0.01;
  EXPECT_THROW(heavy_entries(Q.view(), K.view(), 1.5, o), Error);
  // Too few samples for any (1 +- gamma) guarantee.
  const Mat big = oracle::gaussian(20000, 3, 3);
  o.samples = 10;
  try {
    heavy_entries(Q.view(), big.view(), 0.1, o);
    ADD_FAILURE() << "10 samples accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("samples"), std::string::npos);
  }
}

// The countsketch search (math.md 1.9) against the brute force: keys whose scores all reach eps,
// so that U holds every key and the sketch's buckets collide (|U| = 1280 keys in b = 3200
// buckets per row), and queries near keys, so that every query has heavy entries.
TEST(HeavyEntriesSketched, FindsTheHeavyEntriesWithExactValuesAndNothingElse) {
  const index_t n = 1280, d = 64, m = 96;
  const Mat K = oracle::gaussian(n, d, 31);
  Mat Q = oracle::gaussian(m, d, 32, 0.3);
  for (index_t i = 0; i < m; ++i)
    for (index_t j = 0; j < d; ++j) Q(i, j) += K(13 * i % n, j);
  const double eps = 0.02;
  const auto truth = oracle::heavy_x2(Q, K, eps);
  ASSERT_GE(truth.size(), static_cast<std::size_t>(m));
  std::map<std::pair<index_t, index_t>, double> exact;
  for (const auto& e : truth) exact[{e.i, e.j}] = e.a;
  HeavyOptions o;
  o.search = HeavySearch::countsketch;
  o.delta = 0.05;
  double recall = 0.0;
  const int seeds = 20;
  for (int seed = 0; seed < seeds; ++seed) {
    o.seed = static_cast<std::uint64_t>(seed);
    const HeavyEntries h = heavy_entries(Q.view(), K.view(), eps, o);
    EXPECT_GT(h.universal_size, n / 2);
    EXPECT_EQ(h.sketch_rows, static_cast<index_t>(std::ceil(std::log2(m / (eps * o.delta)))));
    EXPECT_EQ(h.sketch_buckets, 3200);
    EXPECT_LT(h.candidates, m * h.universal_size / 4) << "the sketch pruned little";
    index_t common = 0;
    for (const auto& e : h.entries) {  // precision 1: each entry heavy, with its exact value
      const auto it = exact.find({e.query, e.key});
      ASSERT_NE(it, exact.end()) << "false entry (" << e.query << ", " << e.key << ")";
      EXPECT_NEAR(e.value, it->second, 1e-9 * it->second);
      ++common;
    }
    recall += static_cast<double>(common) / static_cast<double>(truth.size()) / seeds;
  }
  EXPECT_GE(recall, 1.0 - o.delta);
}

TEST(HeavyEntriesSketched, SameEntriesAtEveryThreadCountAndRefusesWhatItCannotSketch) {
  const Mat K = oracle::gaussian(300, 16, 41), Q = oracle::gaussian(40, 16, 42);
  HeavyOptions o;
  o.search = HeavySearch::countsketch;
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  const HeavyEntries one = heavy_entries(Q.view(), K.view(), 0.05, o);
  omp_set_num_threads(threads);
  const HeavyEntries many = heavy_entries(Q.view(), K.view(), 0.05, o);
  ASSERT_EQ(one.entries.size(), many.entries.size());
  for (std::size_t a = 0; a < one.entries.size(); ++a) {
    EXPECT_EQ(one.entries[a].key, many.entries[a].key);
    EXPECT_EQ(one.entries[a].value, many.entries[a].value);
  }
  EXPECT_EQ(one.candidates, many.candidates);
  const auto refused = [&](HeavyOptions bad, const std::string& field) {
    try {
      heavy_entries(Q.view(), K.view(), 0.05, bad);
      ADD_FAILURE() << "accepted: " << field;
    } catch (const Error& e) {
      EXPECT_EQ(e.field(), field) << e.what();
    }
  };
  HeavyOptions bad = o;
  bad.p = 3.0;
  refused(bad, "search countsketch");
  bad = o, bad.normaliser = Normaliser::sampled;
  refused(bad, "search countsketch");
  bad = o, bad.causal = true;
  refused(bad, "search countsketch");
  bad = o, bad.delta = 1.0;
  refused(bad, "delta");
}
