// Select::cluster against the exact per-query top-k oracle, its k-means, its unions and its
// reproducibility.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>

#include "cluster.hpp"
#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::AttentionOptions;
using levattn::index_t;
using levattn::Kernel;
using levattn::Select;
using levattn::Selection;

// Keys around `blobs` well-separated centres; queries near the centres too.
struct Blobs {
  oracle::Mat Q, K;
  std::vector<index_t> blob;  // each key's centre
};
Blobs blobs(index_t m, index_t n, index_t d, index_t count, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  const oracle::Mat centres = oracle::gaussian(count, d, seed + 1, 3.0);
  Blobs b{oracle::Mat(m, d), oracle::Mat(n, d), std::vector<index_t>(static_cast<std::size_t>(n))};
  for (index_t i = 0; i < n; ++i) {
    b.blob[i] = static_cast<index_t>(g() % static_cast<std::uint64_t>(count));
    for (index_t x = 0; x < d; ++x) b.K(i, x) = static_cast<float>(centres(b.blob[i], x) + 0.3 * nd(g));
  }
  for (index_t i = 0; i < m; ++i) {
    const auto c = static_cast<index_t>(g() % static_cast<std::uint64_t>(count));
    for (index_t x = 0; x < d; ++x) b.Q(i, x) = static_cast<float>(centres(c, x) + 0.3 * nd(g));
  }
  return b;
}

Selection select(const oracle::Mat& Q, const oracle::Mat& K, const AttentionOptions& o) {
  return levattn::select_keys({Q.v.data(), 1, 1, Q.rows, Q.cols}, {K.v.data(), 1, 1, K.rows, K.cols}, o);
}

double recall(const Selection& got, const Selection& exact) {
  double hits = 0.0;
  const index_t k = exact.top_k;
  for (index_t i = 0; i < exact.m; ++i) {
    const std::set<index_t> truth(exact.query_keys.begin() + i * k, exact.query_keys.begin() + (i + 1) * k);
    for (index_t a = 0; a < got.top_k; ++a) hits += truth.count(got.query_keys[i * got.top_k + a]) ? 1.0 : 0.0;
  }
  return hits / static_cast<double>(exact.m * k);
}

TEST(Cluster, SearchingEveryClusterIsTheExactTopK) {
  const oracle::Mat Q = oracle::gaussian(150, 8, 1), K = oracle::gaussian(700, 8, 2);
  for (Kernel kernel : {Kernel::softmax, Kernel::power}) {
    AttentionOptions o;
    o.kernel = kernel, o.top_k = 20, o.select = Select::topk;
    const Selection exact = select(Q, K, o);
    o.select = Select::cluster, o.clusters = 30, o.probe = 30;
    const Selection all = select(Q, K, o);
    EXPECT_EQ(all.query_keys, exact.query_keys);  // same keys, same order, same tie-breaks
    EXPECT_TRUE(all.shared_keys.empty());
    EXPECT_EQ(all.window, -1);
  }
}

TEST(Cluster, TiesAtTheCutGoToTheLowerKeyAsInTheExactTopK) {
  // Entries in {-1, 0, 1} in 3 dimensions: many keys share a logit, so the k-th place falls
  // inside a run of ties (and duplicated keys tie exactly).
  std::mt19937_64 g(3);
  oracle::Mat Q(60, 3), K(400, 3);
  for (float& x : Q.v) x = static_cast<float>(static_cast<int>(g() % 3) - 1);
  for (float& x : K.v) x = static_cast<float>(static_cast<int>(g() % 3) - 1);
  for (Kernel kernel : {Kernel::softmax, Kernel::power})
    for (index_t k : {1, 7, 50, 399}) {
      AttentionOptions o;
      o.kernel = kernel, o.top_k = k, o.select = Select::topk;
      const Selection exact = select(Q, K, o);
      o.select = Select::cluster, o.clusters = 9, o.probe = 9;
      EXPECT_EQ(select(Q, K, o).query_keys, exact.query_keys) << "k " << k;
    }
}

// attention() attends each cluster's kept keys by the fused search; the same selection through
// select_keys and selected_attention_forward must give the same rows, and return_selection the
// same keys.
TEST(Cluster, FusedAttentionEqualsAttentionOverItsSelection) {
  const Blobs b = blobs(3000, 4096, 16, 40, 21);
  const oracle::Mat V = oracle::gaussian(4096, 12, 22);
  const levattn::Tensor4Ref Qt{b.Q.v.data(), 1, 1, 3000, 16}, Kt{b.K.v.data(), 1, 1, 4096, 16},
      Vt{V.v.data(), 1, 1, 4096, 12};
  struct Case {
    Kernel kernel;
    index_t top_k, probe, window, sinks;
    double eps;
  };
  // Probing all 64 clusters holds 4096 candidates per query: the 3000 queries take several runs.
  for (const Case& c : {Case{Kernel::softmax, 32, 0, -1, 0, 0.0}, Case{Kernel::softmax, 20, 64, 3, 2, 0.0},
                        Case{Kernel::softmax, 16, 2, -1, 0, 0.05}, Case{Kernel::power, 24, 3, 5, 1, 0.0},
                        Case{Kernel::power, 5000, 1, -1, 0, 0.0}}) {
    AttentionOptions o;
    o.select = Select::cluster, o.kernel = c.kernel, o.top_k = c.top_k, o.probe = c.probe, o.clusters = 64;
    o.window = c.window, o.sinks = c.sinks, o.eps = c.eps, o.return_selection = true;
    std::vector<float> got(3000 * 12);
    const levattn::AttentionResult r = levattn::attention(Qt, Kt, Vt, got.data(), o);
    const Selection s = levattn::select_keys(Qt, Kt, o);
    EXPECT_TRUE(r.selection == s);  // the fused search keeps exactly what select_keys selects
    std::vector<float> ref(got.size()), stat(3000);
    levattn::selected_attention_forward<float>({1, 1, 3000, 4096, 16, 12}, s, o, b.Q.v.data(), b.K.v.data(),
                                               V.v.data(), ref.data(), stat.data());
    EXPECT_LT(oracle::rel_error(got, std::vector<double>(ref.begin(), ref.end())), 1e-5) << "top_k " << c.top_k << " probe " << c.probe;
    double keys = 0.0;
    for (index_t i = 0; i < 3000; ++i) {
      std::set<index_t> mine;
      for (index_t a = 0; a < s.top_k; ++a)
        if (s.query_keys[i * s.top_k + a] >= 0) mine.insert(s.query_keys[i * s.top_k + a]);
      if (!s.shared_keys.empty()) mine.insert(s.shared_keys[0].begin(), s.shared_keys[0].end());
      if (s.window >= 0)
        for (index_t j = std::max<index_t>(0, i - s.window); j <= std::min<index_t>(4095, i + s.window); ++j) mine.insert(j);
      keys += static_cast<double>(mine.size());
    }
    EXPECT_NEAR(r.mean_keys_per_query, keys / 3000.0, 1e-9);
  }
}

// The search splits a task's queries into runs that fit its buffer; each query's keys must not
// depend on where the runs fall.
TEST(Cluster, KeysDoNotDependOnHowQueriesSplitIntoRuns) {
  const Blobs b = blobs(700, 2000, 8, 12, 31);
  using levattn::detail::CounterRng, levattn::detail::Purpose;
  const levattn::detail::KeyClusters kc =
      levattn::detail::cluster_keys(b.K.view(), 20, 8, CounterRng(1, Purpose::cluster_seeds, 0),
                                    CounterRng(1, Purpose::cluster_sample, 0));
  levattn::kernels::KernelParams params;
  params.ops = &levattn::kernels::active_row_ops();
  std::vector<char> excluded(2000, 0);
  for (index_t j = 0; j < 2000; j += 7) excluded[j] = 1;
  const auto keys = [&](std::size_t run_ranks, index_t* runs) {
    std::vector<index_t> out(700 * 10);
    levattn::detail::ClusterWork work;
    *runs = 0;
    levattn::detail::search_clusters(params, b.Q.view(), kc, 4, 10, 0, 700, {excluded.data(), 2}, work,
                                     [&](const levattn::detail::ClusterCandidates& cand) {
                                       ++*runs;
                                       levattn::detail::kept_keys(cand, kc, 10, out.data() + cand.i0 * 10);
                                     }, run_ranks);
    return out;
  };
  index_t one = 0, many = 0, each = 0;
  const std::vector<index_t> whole = keys(std::size_t(1) << 30, &one), split = keys(3000, &many), single = keys(1, &each);
  EXPECT_EQ(one, 1);
  EXPECT_GT(many, 50);
  EXPECT_EQ(each, 700);  // a query whose candidates exceed the buffer runs alone
  EXPECT_EQ(split, whole);
  EXPECT_EQ(single, whole);
}

TEST(Cluster, LogitsThatOverflowAreAnError) {
  oracle::Mat Q = oracle::gaussian(40, 4, 1), K = oracle::gaussian(300, 4, 2);
  for (float& x : Q.v) x *= 1e19f;
  for (float& x : K.v) x *= 1e19f;
  const oracle::Mat V = oracle::gaussian(300, 2, 3);
  AttentionOptions o;
  o.select = Select::cluster, o.top_k = 8;
  EXPECT_NE(oracle::error_of([&] { select(Q, K, o); }).second.find("overflow"), std::string::npos);
  EXPECT_NE(oracle::error_of([&] { levattn::attention(Q.view(), K.view(), V.view(), o); }).second.find("overflow"),
            std::string::npos);
}

TEST(Cluster, RecallOfTheExactTopKGrowsWithTheClustersSearched) {
  const Blobs b = blobs(300, 4000, 16, 40, 3);
  AttentionOptions o;
  o.top_k = 32, o.select = Select::topk;
  const Selection exact = select(b.Q, b.K, o);
  o.select = Select::cluster, o.clusters = 64;
  double last = 0.0;
  for (index_t probe : {1, 4, 16, 64}) {
    o.probe = probe;
    const double r = recall(select(b.Q, b.K, o), exact);
    EXPECT_GE(r, last - 1e-12) << "probe " << probe;
    last = r;
  }
  EXPECT_EQ(last, 1.0);
  o.probe = 0;  // the default: 2 k c / n = 2 * 32 * 64 / 4000 -> 2, so max(4, 64 / 32) = 4 of 64
  EXPECT_GE(recall(select(b.Q, b.K, o), exact), 0.9);
}

TEST(Cluster, KMeansRecoversSeparatedBlobs) {
  const Blobs b = blobs(1, 2000, 8, 6, 5);
  using levattn::detail::CounterRng, levattn::detail::Purpose;
  const levattn::detail::KeyClusters kc = levattn::detail::cluster_keys(
      b.K.view(), 6, 20, CounterRng(9, Purpose::cluster_seeds, 0), CounterRng(9, Purpose::cluster_sample, 0));
  ASSERT_EQ(kc.count, 6);
  ASSERT_EQ(kc.start.back(), 2000);
  std::vector<index_t> order = kc.order;
  std::sort(order.begin(), order.end());
  for (index_t i = 0; i < 2000; ++i) ASSERT_EQ(order[i], i);  // a permutation of the keys
  // Each cluster holds keys of one blob (random starts may merge two blobs and split another;
  // a cluster mixing blobs that are 3 sd apart in 8 dimensions would be a wrong assignment).
  index_t pure = 0;
  for (index_t j = 0; j < 6; ++j) {
    std::set<index_t> seen;
    for (index_t a = kc.start[j]; a < kc.start[j + 1]; ++a) seen.insert(b.blob[kc.order[a]]);
    pure += seen.size() <= 1;
  }
  EXPECT_GE(pure, 4);
}

TEST(Cluster, OwnKeysAvoidTheSharedSetAndTheWindow) {
  const oracle::Mat Q = oracle::gaussian(200, 6, 7), K = oracle::gaussian(200, 6, 8);
  AttentionOptions o;
  o.select = Select::cluster, o.top_k = 12, o.eps = 0.05, o.window = 4, o.sinks = 3, o.probe = 1000;
  const Selection s = select(Q, K, o);
  ASSERT_EQ(s.shared_keys.size(), 1u);
  std::vector<index_t> expected = levattn::universal_set(K.view(), 0.05).indices;
  for (index_t j = 0; j < 3; ++j) expected.push_back(j);
  std::sort(expected.begin(), expected.end());
  expected.erase(std::unique(expected.begin(), expected.end()), expected.end());
  EXPECT_EQ(s.shared_keys[0], expected);
  EXPECT_EQ(s.window, 4);
  // With every cluster searched, the own keys are the exact top-12 of the keys outside both.
  const double scale = 1.0 / std::sqrt(6.0);
  for (index_t i = 0; i < 200; ++i) {
    std::vector<std::pair<double, index_t>> rest;
    for (index_t j = 0; j < 200; ++j)
      if (!std::binary_search(expected.begin(), expected.end(), j) && std::llabs(i - j) > 4)
        rest.push_back({-static_cast<float>(scale * oracle::dot(Q, i, K, j)), j});
    std::sort(rest.begin(), rest.end());
    std::vector<index_t> top(12);
    for (index_t a = 0; a < 12; ++a) top[a] = rest[a].second;
    std::sort(top.begin(), top.end());  // written ascending
    for (index_t a = 0; a < 12; ++a) EXPECT_EQ(s.query_keys[i * 12 + a], top[a]) << i;
  }
}

TEST(Cluster, ReproducibleBySeedAtEveryThreadCount) {
  const Blobs b = blobs(500, 3000, 16, 30, 11);
  std::vector<float> q2(b.Q.v), k2(b.K.v);
  q2.insert(q2.end(), b.Q.v.begin(), b.Q.v.end());
  k2.insert(k2.end(), b.K.v.begin(), b.K.v.end());
  AttentionOptions o;
  o.select = Select::cluster, o.top_k = 16, o.seed = 4;
  const auto runs = oracle::at_each_thread_count([&] {
    return levattn::select_keys({q2.data(), 1, 2, 500, 16}, {k2.data(), 1, 2, 3000, 16}, o).query_keys;
  });
  for (const auto& r : runs) EXPECT_EQ(r, runs[0]);
  // The fused attention too, bit for bit.
  const std::vector<float> v2 = oracle::gaussian(6000, 8, 5).v;
  const auto outs = oracle::at_each_thread_count([&] {
    std::vector<float> out(2 * 500 * 8);
    levattn::attention({q2.data(), 1, 2, 500, 16}, {k2.data(), 1, 2, 3000, 16}, {v2.data(), 1, 2, 3000, 8}, out.data(), o);
    return out;
  });
  for (const auto& r : outs) EXPECT_EQ(r, outs[0]);
}

TEST(Cluster, DefaultProbeSearchesAboutTwiceTheBudgetAndAQuarterOfFewKeys) {
  EXPECT_EQ(levattn::default_probe(128, 16384, 256), 4);   // 4 * 128 keys = 2 * 256
  EXPECT_EQ(levattn::default_probe(256, 65536, 256), 8);   // c / 32
  EXPECT_EQ(levattn::default_probe(15, 197, 32), 5);       // ceil(2 * 32 * 15 / 197)
  EXPECT_EQ(levattn::default_probe(23, 512, 16), 6);       // ceil(128 * 23 / 512): a quarter of the keys
  EXPECT_EQ(levattn::default_probe(32, 1024, 16), 8);      // a quarter: 256 keys
  EXPECT_EQ(levattn::default_probe(46, 2048, 16), 6);      // ceil(256 * 46 / 2048): 256 keys
  EXPECT_EQ(levattn::default_probe(46, 2048, 256), 12);    // ceil(2 * 256 * 46 / 2048)
  EXPECT_EQ(levattn::default_probe(15, 197, 128), 15);     // every cluster
  EXPECT_EQ(levattn::default_probe(3, 9, 1), 3);           // at most c
}

TEST(Cluster, RejectsBadOptions) {
  const oracle::Mat Q = oracle::gaussian(10, 4, 1), K = oracle::gaussian(30, 4, 2);
  AttentionOptions o;
  o.select = Select::cluster;
  EXPECT_NE(oracle::error_of([&] { select(Q, K, o); }).second.find("per-query budget"), std::string::npos);
  o.top_k = 3, o.probe = -1;
  EXPECT_NE(oracle::error_of([&] { select(Q, K, o); }).second.find("probe"), std::string::npos);
  o.probe = 0, o.eps = 2.0;
  EXPECT_NE(oracle::error_of([&] { select(Q, K, o); }).second.find("eps"), std::string::npos);
}

}  // namespace

TEST(Cluster, ShortQueriesCountTheQueriesWithFewerThanTopKOwnKeys) {
  // 40 clusters of about 12 keys, one probed, top_k 30: most queries fall short; the count is
  // that of the rows of query_keys holding an unused slot (-1). Probing every cluster: none.
  const Blobs b = blobs(120, 500, 8, 40, 7);
  std::vector<float> out(static_cast<std::size_t>(120 * 8));
  AttentionOptions o;
  o.select = Select::cluster, o.top_k = 30, o.clusters = 40, o.probe = 1, o.return_selection = true;
  const levattn::Tensor4Ref q{b.Q.v.data(), 1, 1, 120, 8}, k{b.K.v.data(), 1, 1, 500, 8};
  const levattn::AttentionResult r = levattn::attention(q, k, k, out.data(), o);
  index_t rows_with_gaps = 0;
  for (index_t i = 0; i < 120; ++i)
    rows_with_gaps += std::count(r.selection.query_keys.begin() + i * 30, r.selection.query_keys.begin() + (i + 1) * 30, -1) > 0;
  EXPECT_GT(rows_with_gaps, 60);
  EXPECT_EQ(r.short_queries, rows_with_gaps);
  o.probe = 40;
  EXPECT_EQ(levattn::attention(q, k, k, out.data(), o).short_queries, 0);
  o.select = Select::topk, o.clusters = 0, o.probe = 0;
  EXPECT_EQ(levattn::attention(q, k, k, out.data(), o).short_queries, 0);
}
