// Causal attention: every selection cut at the query (against float64 masked attention), the
// causal leverage sets keep every eps-heavy causal x^2 entry (brute force, adversarial keys and
// the exact worst-case queries), causal heavy entries equal brute force, and the sets are
// the prefix universal sets at each block start.
#include <gtest/gtest.h>
#include <lapacke.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::AttentionOptions;
using levattn::index_t;
using levattn::Kernel;
using levattn::Select;
using levattn::Selection;
using oracle::Mat;

// Rows of a (pairs x rows x cols) array as one pair's matrix.
Mat pair_of(const Mat& all, index_t pairs, index_t h) {
  const index_t rows = all.rows / pairs;
  Mat m(rows, all.cols);
  std::copy_n(all.v.begin() + h * rows * all.cols, rows * all.cols, m.v.begin());
  return m;
}

// Whether query i of pair h attends key j, read from the selection's fields.
bool selected(const Selection& s, index_t h, index_t i, index_t j) {
  if (s.causal && j > i) return false;
  if (s.all_keys) return true;
  if (!s.shared_keys.empty()) {
    const index_t segs = s.segment > 0 ? (s.m + s.segment - 1) / s.segment : 1;
    const auto& set = s.shared_keys[h * segs + (s.segment > 0 ? i / s.segment : 0)];
    if (std::find(set.begin(), set.end(), j) != set.end()) return true;
  }
  if (s.window >= 0 && std::llabs(i - j) <= s.window) return true;
  for (index_t a = 0; a < s.top_k; ++a)
    if (s.query_keys[(h * s.m + i) * s.top_k + a] == j) return true;
  return false;
}

struct Selections {
  const char* name;
  AttentionOptions o;
};

std::vector<Selections> causal_selections() {
  std::vector<Selections> out;
  const auto add = [&](const char* name, Select s, Kernel kern, index_t top_k, double eps, index_t window, index_t sinks) {
    AttentionOptions o;
    o.causal = true, o.select = s, o.kernel = kern, o.top_k = top_k, o.eps = eps, o.window = window, o.sinks = sinks;
    o.seed = 3, o.p = 2;
    out.push_back({name, o});
  };
  add("full", Select::full, Kernel::softmax, 0, 0, -1, 0);
  add("full poly", Select::full, Kernel::power, 0, 0, -1, 0);
  add("window + sinks", Select::window, Kernel::softmax, 0, 0, 9, 2);
  add("random + window", Select::random, Kernel::softmax, 40, 0, 4, 0);
  add("topk", Select::topk, Kernel::softmax, 12, 0, -1, 0);
  add("topk poly", Select::topk, Kernel::power, 7, 0, -1, 0);
  add("leverage eps", Select::leverage, Kernel::softmax, 0, 0.05, -1, 0);
  add("leverage eps + window + sinks", Select::leverage, Kernel::softmax, 0, 0.1, 16, 3);
  add("leverage eps poly p=2", Select::leverage, Kernel::power, 0, 0.05, 8, 0);
  add("cluster + window", Select::cluster, Kernel::softmax, 10, 0, 5, 0);
  add("cluster + eps + sinks", Select::cluster, Kernel::softmax, 10, 0.1, -1, 2);
  return out;
}

// 700 queries and keys (three causal blocks, the last partial), 2 heads, d = 16.
TEST(Causal, EverySelectionAttendsOnlyEarlierKeysAndMatchesMaskedAttention) {
  const index_t pairs = 2, n = 700, d = 16, dv = 5;
  const Mat Q = oracle::gaussian(pairs * n, d, 1), K = oracle::gaussian(pairs * n, d, 2),
            V = oracle::gaussian(pairs * n, dv, 3);
  const levattn::Tensor4Ref q{Q.v.data(), 1, pairs, n, d}, k{K.v.data(), 1, pairs, n, d}, v{V.v.data(), 1, pairs, n, dv};
  for (const auto& c : causal_selections()) {
    SCOPED_TRACE(c.name);
    const Selection sel = levattn::select_keys(q, k, c.o);
    EXPECT_TRUE(sel.causal);
    std::vector<float> out(static_cast<std::size_t>(pairs * n * dv));
    const levattn::AttentionResult res = levattn::attention(q, k, v, out.data(), c.o);
    const bool softmax = c.o.kernel == Kernel::softmax;
    const double scale = softmax ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0;
    double keys = 0.0;
    for (index_t h = 0; h < pairs; ++h) {
      const Mat Qh = pair_of(Q, pairs, h), Kh = pair_of(K, pairs, h), Vh = pair_of(V, pairs, h);
      const auto ref = oracle::attention(Qh, Kh, Vh, softmax, scale, 2.0,
                                         [&](index_t i, index_t j) { return selected(sel, h, i, j); });
      const std::vector<float> mine(out.begin() + h * n * dv, out.begin() + (h + 1) * n * dv);
      EXPECT_LT(oracle::rel_error(mine, ref), 3e-5);
      for (index_t i = 0; i < n; ++i) {
        // No key after the query in any part of the selection.
        for (index_t a = 0; a < sel.top_k; ++a) EXPECT_LE(sel.query_keys[(h * n + i) * sel.top_k + a], i);
        for (index_t j = 0; j < n; ++j) keys += selected(sel, h, i, j) ? 1.0 : 0.0;
      }
    }
    EXPECT_NEAR(res.mean_keys_per_query, keys / static_cast<double>(pairs * n), 1e-9);
    if (c.o.select == Select::full) {
      EXPECT_NEAR(res.mean_keys_per_query, (n + 1) / 2.0, 1e-9);
    }
  }
}

// Adversarial keys for the causal guarantee.
std::vector<std::pair<const char*, Mat>> adversarial_keys(index_t n, index_t d) {
  std::vector<std::pair<const char*, Mat>> out;
  out.emplace_back("gaussian", oracle::gaussian(n, d, 11));
  // Small keys, with a rare direction carried by a few large keys arriving late.
  Mat late = oracle::gaussian(n, d, 12, 0.01);
  for (index_t j = 0; j < n; ++j) late(j, 0) = 0.0f;
  for (index_t j : {40, 333, 520, 599}) late(j, 0) = 5.0f;
  out.emplace_back("rare direction, late", late);
  // Norms growing along the sequence: the newest keys dominate every prefix.
  Mat growing = oracle::gaussian(n, d, 13);
  for (index_t j = 0; j < n; ++j)
    for (index_t x = 0; x < d; ++x) growing(j, x) *= static_cast<float>(std::pow(1.01, static_cast<double>(j)));
  out.emplace_back("growing norms", growing);
  // Rank 3 with repeated keys.
  Mat low(n, d);
  const Mat basis = oracle::gaussian(3, d, 14), coef = oracle::gaussian(n, 3, 15);
  for (index_t j = 0; j < n; ++j)
    for (index_t x = 0; x < d; ++x)
      low(j, x) = j % 5 == 0 && j > 0 ? low(j - 1, x)
                                      : static_cast<float>(coef(j, 0) * basis(0, x) + coef(j, 1) * basis(1, x) +
                                                           coef(j, 2) * basis(2, x));
  out.emplace_back("rank 3, duplicates", low);
  return out;
}

// For each query i, the query that makes key j(i) as heavy as it can be among keys 0 .. i:
// q = M_i^+ k_j (A_ij = k_j^T M_i^+ k_j, its prefix leverage score), with j(i) drawn at random
// from the keys whose prefix score is closest above eps; queries before there are random.
Mat worst_case_queries(const Mat& K, double eps, std::uint64_t seed) {
  const index_t n = K.rows, d = K.cols;
  Mat Q = oracle::gaussian(n, d, seed);
  std::mt19937_64 g(seed);
  for (index_t i = 2 * d; i < n; i += 3) {
    Mat prefix(i + 1, d);
    std::copy_n(K.v.begin(), (i + 1) * d, prefix.v.begin());
    const std::vector<double> tau = oracle::leverage_svd(prefix);
    index_t best = -1;
    for (index_t j = 0; j <= i; ++j)
      if (tau[j] >= eps && (best < 0 || tau[j] < tau[best] || (tau[j] == tau[best] && g() % 2))) best = j;
    if (best < 0) continue;
    // Solve (M + tiny I) q = k_best in float64 (M = prefix^T prefix).
    std::vector<double> M(static_cast<std::size_t>(d * d), 0.0), b(static_cast<std::size_t>(d));
    for (index_t l = 0; l <= i; ++l)
      for (index_t x = 0; x < d; ++x)
        for (index_t y = 0; y < d; ++y) M[x * d + y] += static_cast<double>(K(l, x)) * K(l, y);
    double tr = 0.0;
    for (index_t x = 0; x < d; ++x) tr += M[x * d + x];
    for (index_t x = 0; x < d; ++x) M[x * d + x] += 1e-9 * tr, b[x] = K(best, x);
    LAPACKE_dposv(LAPACK_ROW_MAJOR, 'U', static_cast<lapack_int>(d), 1, M.data(), static_cast<lapack_int>(d), b.data(), 1);
    double norm = 0.0;
    for (double x : b) norm = std::max(norm, std::fabs(x));
    for (index_t x = 0; x < d; ++x) Q(i, x) = static_cast<float>(b[x] / norm);
  }
  return Q;
}

TEST(Causal, LeverageSetsKeepEveryHeavyCausalEntry) {
  const index_t n = 600, d = 8;
  for (const auto& [name, K] : adversarial_keys(n, d)) {
    for (const double eps : {0.05, 0.2}) {
      SCOPED_TRACE(std::string(name) + ", eps " + std::to_string(eps));
      const Mat Q = worst_case_queries(K, eps, 21);
      AttentionOptions o;
      o.causal = true, o.select = Select::leverage, o.eps = eps;
      const Selection sel = levattn::select_keys({Q.v.data(), 1, 1, n, d}, {K.v.data(), 1, 1, n, d}, o);
      const auto heavy = oracle::heavy_x2_causal(Q, K, eps);
      ASSERT_FALSE(heavy.empty());
      index_t missed = 0, at_threshold = 0;
      for (const auto& e : heavy) {
        missed += selected(sel, 0, e.i, e.j) ? 0 : 1;
        at_threshold += e.a < 1.5 * eps ? 1 : 0;
      }
      EXPECT_EQ(missed, 0) << "of " << heavy.size() << " heavy entries";
      EXPECT_GT(at_threshold, 0);  // the worst-case queries reach near the threshold

      const levattn::HeavyEntries mine = levattn::causal_heavy_entries(Q.view(), K.view(), eps);
      // Equal to brute force, away from the threshold's rounding.
      std::vector<std::pair<index_t, index_t>> found;
      for (const auto& e : mine.entries) {
        found.emplace_back(e.query, e.key);
        EXPECT_LE(e.key, e.query);
      }
      index_t checked = 0;
      for (const auto& e : heavy) {
        if (e.a < eps * (1 + 1e-6)) continue;
        ++checked;
        const auto it = std::lower_bound(found.begin(), found.end(), std::make_pair(e.i, e.j));
        ASSERT_TRUE(it != found.end() && *it == std::make_pair(e.i, e.j)) << e.i << ", " << e.j;
        EXPECT_NEAR(mine.entries[it - found.begin()].value, e.a, 1e-6 * e.a);
      }
      EXPECT_GE(static_cast<std::size_t>(checked) + 2 * mine.zero_rows.size() + 8, mine.entries.size());
      // heavy_entries with causal options is the same call.
      levattn::HeavyOptions ho;
      ho.causal = true;
      const levattn::HeavyEntries via = levattn::heavy_entries(Q.view(), K.view(), eps, ho);
      ASSERT_EQ(via.entries.size(), mine.entries.size());
      for (std::size_t a = 0; a < via.entries.size(); ++a) {
        EXPECT_EQ(via.entries[a].query, mine.entries[a].query);
        EXPECT_EQ(via.entries[a].key, mine.entries[a].key);
        EXPECT_EQ(via.entries[a].value, mine.entries[a].value);
      }
    }
  }
}

// Each block's candidates are the keys before it whose prefix score is >= eps (float64 SVD of the
// prefix), up to the rounding margin; the block's own keys follow.
TEST(Causal, SetsAreThePrefixUniversalSetsAtEachBlockStart) {
  const index_t n = 900, d = 10, block = 128;
  const double eps = 0.08;
  const Mat K = oracle::gaussian(n, d, 31);
  const Selection cs = levattn::causal_universal_sets(K.view(), eps, block);
  ASSERT_TRUE(cs.causal && cs.segment == block && cs.m == n && cs.n == n && cs.pairs() == 1);
  ASSERT_EQ(static_cast<index_t>(cs.shared_keys.size()), (n + block - 1) / block);
  index_t most = 0;
  for (index_t r = 0; r < static_cast<index_t>(cs.shared_keys.size()); ++r) {
    const index_t r0 = r * block, r1 = std::min(n, r0 + block);
    const auto& set = cs.shared_keys[r];
    ASSERT_TRUE(std::is_sorted(set.begin(), set.end()));
    ASSERT_GE(static_cast<index_t>(set.size()), r1 - r0);
    for (index_t j = r0; j < r1; ++j) EXPECT_EQ(set[set.size() - (r1 - j)], j);
    std::vector<index_t> before(set.begin(), set.end() - (r1 - r0));
    most = std::max(most, static_cast<index_t>(before.size()));
    if (r0 == 0) continue;
    Mat prefix(r0, d);
    std::copy_n(K.v.begin(), r0 * d, prefix.v.begin());
    const auto tau = oracle::leverage_svd(prefix);
    for (index_t j = 0; j < r0; ++j) {
      const bool in = std::binary_search(before.begin(), before.end(), j);
      if (tau[j] >= eps * (1 + 1e-3)) {
        EXPECT_TRUE(in) << "block " << r << " key " << j;
      }
      if (tau[j] < eps * (1 - 1e-3)) {
        EXPECT_FALSE(in) << "block " << r << " key " << j;
      }
    }
  }
  EXPECT_LE(most, static_cast<index_t>(d / eps * 1.01));
}

TEST(Causal, ResultsDoNotDependOnThreadCount) {
  const index_t pairs = 3, n = 600, d = 16;
  const Mat Q = oracle::gaussian(pairs * n, d, 41), K = oracle::gaussian(pairs * n, d, 42), V = oracle::gaussian(pairs * n, d, 43);
  for (const auto& c : causal_selections()) {
    SCOPED_TRACE(c.name);
    const auto runs = oracle::at_each_thread_count([&] {
      std::vector<float> out(static_cast<std::size_t>(pairs * n * d));
      levattn::attention({Q.v.data(), 1, pairs, n, d}, {K.v.data(), 1, pairs, n, d}, {V.v.data(), 1, pairs, n, d},
                         out.data(), c.o);
      return out;
    });
    for (const auto& r : runs) EXPECT_EQ(r, runs[0]);
  }
}

TEST(Causal, RejectsWhatHasNoCausalMeaning) {
  const Mat Q = oracle::gaussian(50, 8, 51), K = oracle::gaussian(60, 8, 52), V = oracle::gaussian(60, 4, 53);
  AttentionOptions o;
  o.causal = true;
  const auto run = [&](const Mat& q, const AttentionOptions& opt) {
    return oracle::error_of([&] { levattn::attention(q.view(), K.view(), V.view(), opt); }).second;
  };
  EXPECT_NE(run(Q, o).find("as many queries as keys"), std::string::npos);
  const Mat Qs = oracle::gaussian(60, 8, 54);
  o.select = Select::leverage, o.top_k = 10;
  EXPECT_NE(run(Qs, o).find("give eps"), std::string::npos);
  o.top_k = 0, o.eps = 0.1, o.kernel = Kernel::power, o.p = 3;
  EXPECT_NE(run(Qs, o).find("p must be 2"), std::string::npos);
  o.kernel = Kernel::softmax, o.leverage.method = levattn::ScoreMethod::sketch;
  EXPECT_NE(run(Qs, o).find("exact"), std::string::npos);
  EXPECT_NE(oracle::error_of([&] { levattn::causal_heavy_entries(Q.view(), K.view(), 0.1); }).second.find("rows"),
            std::string::npos);
  levattn::LeverageOptions ridge;
  ridge.ridge = 1.0;
  EXPECT_NE(oracle::error_of([&] { levattn::causal_heavy_entries(Qs.view(), K.view(), 0.1, ridge); }).second.find("ridge"),
            std::string::npos);
  // The library decides these rules for every front end: causal heavy entries are x^2 with exact
  // normalisers, and no heavy-entry search nor |x|^p bound takes a ridge.
  levattn::HeavyOptions ho;
  ho.causal = true, ho.p = 3;
  EXPECT_NE(oracle::error_of([&] { levattn::heavy_entries(Qs.view(), K.view(), 0.1, ho); }).second.find("causal"),
            std::string::npos);
  ho.p = 2, ho.normaliser = levattn::Normaliser::sampled;
  EXPECT_NE(oracle::error_of([&] { levattn::heavy_entries(Qs.view(), K.view(), 0.1, ho); }).second.find("exact"),
            std::string::npos);
  ho = {}, ho.leverage = ridge;
  EXPECT_NE(oracle::error_of([&] { levattn::heavy_entries(Qs.view(), K.view(), 0.1, ho); }).second.find("ridge"),
            std::string::npos);
  ho.p = 3;
  EXPECT_NE(oracle::error_of([&] { levattn::heavy_entries(Qs.view(), K.view(), 0.1, ho); }).second.find("ridge"),
            std::string::npos);
  EXPECT_NE(oracle::error_of([&] { levattn::sensitivity_bounds(K.view(), 3.0, ridge); }).second.find("ridge"),
            std::string::npos);
  EXPECT_NE(oracle::error_of([&] { levattn::causal_universal_sets(K.view(), 0.0); }).second.find("eps"), std::string::npos);
  o.leverage = ridge;  // ridge scores can be below eps for a key that is heavy: no causal set from them
  EXPECT_NE(run(Qs, o).find("ridge"), std::string::npos);
  o.leverage = {};
  o.return_selection = true;
  const levattn::AttentionResult r = levattn::attention({Qs.v.data(), 1, 1, 60, 8}, {K.v.data(), 1, 1, 60, 8},
                                                        {V.v.data(), 1, 1, 60, 4}, std::vector<float>(240).data(), o);
  std::vector<float> approx(240);
  EXPECT_NE(oracle::error_of([&] { levattn::selection_metrics(Qs.view(), K.view(), V.view(), approx.data(), o, r.selection); })
                .second.find("causal"),
            std::string::npos);
  EXPECT_NE(oracle::error_of([&] { levattn::causal_universal_sets(K.view(), 0.1, 0); }).second.find("block"),
            std::string::npos);
}

}  // namespace
