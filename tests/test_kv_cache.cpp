// The KV cache against brute force: decoding token by token equals softmax attention over the
// keys it keeps, it never evicts a key whose prefix score is >= eps (nor a sink or window token),
// every eps-heavy x^2 entry of a query is among its keys, its memory stays bounded, any split of
// the same tokens gives the same cache, and its mass reports equal the float64 oracle.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::index_t;
using levattn::KVCache;
using levattn::KVCacheOptions;
using oracle::Mat;

// Token t of head h of a (heads x n x cols) stack, as a pointer.
const float* row(const Mat& m, index_t n, index_t h, index_t t) { return m.v.data() + (h * n + t) * m.cols; }

// Heads x n keys with log-normal norms (keys of high and low leverage), one stack.
Mat keys_of(index_t heads, index_t n, index_t d, std::uint64_t seed) {
  Mat k = oracle::gaussian(heads * n, d, seed);
  const Mat scale = oracle::gaussian(heads * n, 1, seed + 1);
  for (index_t r = 0; r < heads * n; ++r)
    for (index_t x = 0; x < d; ++x) k(r, x) *= std::exp(scale(r, 0));
  return k;
}

TEST(KVCache, DecodingAttendsExactlyItsKeptKeysAndNeverEvictsAHeavyOne) {
  // batch 2, 2 kv heads, 4 query heads (groups of 2), 700 tokens one at a time.
  const index_t batch = 2, kv = 2, qh = 4, n = 700, d = 8, dv = 3;
  KVCacheOptions o;
  o.eps = 0.05, o.window = 16, o.sinks = 2, o.prune_every = 64;
  KVCache cache(batch, kv, d, dv, o);
  const Mat K = keys_of(batch * kv, n, d, 1), V = oracle::gaussian(batch * kv * n, dv, 2),
            Q = oracle::gaussian(batch * qh * n, d, 3);
  std::vector<float> kt(static_cast<std::size_t>(batch * kv * d)), vt(static_cast<std::size_t>(batch * kv * dv)),
      qt(static_cast<std::size_t>(batch * qh * d)), out(static_cast<std::size_t>(batch * qh * dv));
  index_t checked_heavy = 0;
  for (index_t t = 0; t < n; ++t) {
    for (index_t h = 0; h < batch * kv; ++h) {
      std::copy_n(row(K, n, h, t), d, kt.data() + h * d);
      std::copy_n(row(V, n, h, t), dv, vt.data() + h * dv);
    }
    for (index_t h = 0; h < batch * qh; ++h) std::copy_n(row(Q, n, h, t), d, qt.data() + h * d);
    cache.append({kt.data(), batch, kv, 1, d}, {vt.data(), batch, kv, 1, dv});
    const auto rep = cache.attend({qt.data(), batch, qh, 1, d}, out.data());
    if (t % 37 != 0 && t != n - 1) continue;
    for (index_t h = 0; h < batch * kv; ++h) {
      const std::vector<index_t>& kept = cache.kept(h / kv, h % kv);
      ASSERT_EQ(rep.kept[h], static_cast<index_t>(kept.size()));
      const auto has = [&](index_t j) { return std::binary_search(kept.begin(), kept.end(), j); };
      // Sinks, window, and every key whose prefix score (float64 SVD of keys 0 .. t) is >= eps.
      for (index_t j = 0; j < std::min<index_t>(o.sinks, t + 1); ++j) EXPECT_TRUE(has(j));
      for (index_t j = std::max<index_t>(0, t + 1 - o.window); j <= t; ++j) EXPECT_TRUE(has(j));
      Mat prefix(t + 1, d), pv(t + 1, dv);
      for (index_t j = 0; j <= t; ++j) {
        std::copy_n(row(K, n, h, j), d, &prefix(j, 0));
        std::copy_n(row(V, n, h, j), dv, &pv(j, 0));
      }
      const auto tau = oracle::leverage_svd(prefix);
      for (index_t j = 0; j <= t; ++j)
        if (tau[j] >= o.eps * (1 + 1e-3)) {
          EXPECT_TRUE(has(j)) << "token " << t << " evicted key " << j;
        }
      EXPECT_LE(static_cast<index_t>(kept.size()), static_cast<index_t>(d / o.eps * 1.01) + o.prune_every + o.window + o.sinks);
      // Each of the group's query heads: softmax over exactly the kept keys, and its heavy x^2 entries kept.
      for (index_t g = 0; g < qh / kv; ++g) {
        const index_t qhead = (h / kv) * qh + (h % kv) * (qh / kv) + g;
        Mat q1(1, d);
        std::copy_n(qt.data() + qhead * d, d, q1.v.data());
        const auto ref = oracle::attention(q1, prefix, pv, true, 1.0 / std::sqrt(static_cast<double>(d)), 2.0,
                                           [&](index_t, index_t j) { return has(j); });
        const std::vector<float> mine(out.begin() + qhead * dv, out.begin() + (qhead + 1) * dv);
        EXPECT_LT(oracle::rel_error(mine, ref), 1e-5);
        for (const auto& e : oracle::heavy_x2(q1, prefix, o.eps)) {
          EXPECT_TRUE(has(e.j)) << "token " << t << ": heavy key " << e.j << " (A = " << e.a << ") evicted";
          ++checked_heavy;
        }
      }
    }
  }
  EXPECT_GT(checked_heavy, 50);
  EXPECT_LT(cache.kept(0, 0).size(), static_cast<std::size_t>(n / 2));  // it did evict
}

TEST(KVCache, AnySplitOfTheTokensGivesTheSameCacheAndMemoryStaysBounded) {
  const index_t n = 5000, d = 6, dv = 2;
  KVCacheOptions o;
  o.eps = 0.1, o.window = 8, o.sinks = 1, o.prune_every = 100;
  const Mat K = keys_of(1, n, d, 11), V = oracle::gaussian(n, dv, 12), Q = oracle::gaussian(3, d, 13);
  const auto run = [&](index_t block) {
    KVCache c(1, 1, d, dv, o);
    std::size_t peak = 0;
    for (index_t t = 0; t < n; t += block) {
      const index_t rows = std::min(block, n - t);
      c.append({row(K, n, 0, t), 1, 1, rows, d}, {row(V, n, 0, t), 1, 1, rows, dv});
      peak = std::max(peak, c.bytes());
    }
    std::vector<float> out(static_cast<std::size_t>(3 * dv));
    c.attend({Q.v.data(), 1, 1, 3, d}, out.data());
    return std::make_tuple(c.kept(0, 0), out, peak);
  };
  const auto [kept1, out1, peak1] = run(1);
  for (index_t block : {7, 100, 999, 5000}) {
    const auto [kept, out, peak] = run(block);
    EXPECT_EQ(kept, kept1) << block;
    EXPECT_EQ(out, out1) << block;
  }
  {
    // The longest schedule: the streams never prune on their own between the cache's prunes.
    o.prune_every = levattn::kMaxPruneEvery;
    const auto [kept_a, out_a, peak_a] = run(1);
    const auto [kept_b, out_b, peak_b] = run(5000);
    EXPECT_EQ(kept_a, kept_b);
    EXPECT_EQ(out_a, out_b);
    o.prune_every = 100;
  }
  // The cache of 5000 tokens holds no more than about d / eps + prune_every + window + sinks rows.
  EXPECT_LE(static_cast<index_t>(kept1.size()), static_cast<index_t>(d / o.eps * 1.01) + o.prune_every + o.window + o.sinks);
  KVCache longer(1, 1, d, dv, o);
  std::size_t peak_long = 0;
  for (index_t rep = 0; rep < 8; ++rep)
    for (index_t t = 0; t < n; t += 500) {
      longer.append({row(K, n, 0, t), 1, 1, 500, d}, {row(V, n, 0, t), 1, 1, 500, dv});
      if (rep > 0) peak_long = std::max(peak_long, longer.bytes());
    }
  EXPECT_EQ(longer.tokens(), 8 * n);
  EXPECT_LE(static_cast<double>(peak_long), 1.5 * static_cast<double>(peak1) + 65536.0);
}

TEST(KVCache, MassReportsMatchTheOracle) {
  const index_t n = 900, d = 5, dv = 2;
  KVCacheOptions o;
  o.eps = 0.2, o.window = 4, o.sinks = 1, o.keep_full = true;
  KVCache c(1, 1, d, dv, o);
  const Mat K = keys_of(1, n, d, 21), V = oracle::gaussian(n, dv, 22), Q = oracle::gaussian(6, d, 23);
  c.append({K.v.data(), 1, 1, n, d}, {V.v.data(), 1, 1, n, dv});
  std::vector<float> out(static_cast<std::size_t>(6 * dv));
  for (const levattn::Kernel kern : {levattn::Kernel::softmax, levattn::Kernel::power}) {
    levattn::AttentionOptions ko;
    ko.kernel = kern, ko.p = 3;
    const auto rep = c.attend({Q.v.data(), 1, 1, 6, d}, out.data(), ko, true);
    ASSERT_EQ(rep.x2_mass.size(), 6u);
    ASSERT_EQ(rep.kernel_mass.size(), 6u);
    const auto& kept = c.kept(0, 0);
    ASSERT_LT(kept.size(), static_cast<std::size_t>(n));
    for (index_t i = 0; i < 6; ++i) {
      double in2 = 0, all2 = 0, inf = 0, allf = 0, top = -INFINITY;
      const double scale = kern == levattn::Kernel::softmax ? 1.0 / std::sqrt(5.0) : 1.0;
      for (index_t j = 0; j < n; ++j) top = std::max(top, scale * oracle::dot(Q, i, K, j));
      for (index_t j = 0; j < n; ++j) {
        const double s = oracle::dot(Q, i, K, j);
        const double f = kern == levattn::Kernel::softmax ? std::exp(scale * s - top) : std::pow(std::fabs(s), 3.0);
        const bool in = std::binary_search(kept.begin(), kept.end(), j);
        all2 += s * s, allf += f;
        if (in) in2 += s * s, inf += f;
      }
      EXPECT_NEAR(rep.x2_mass[i], in2 / all2, 1e-9);
      EXPECT_NEAR(rep.kernel_mass[i], inf / allf, 1e-9);
      EXPECT_LT(rep.x2_mass[i], 1.0);  // keys were evicted: random queries lose mass, heavy entries do not
    }
  }
}

TEST(KVCache, RejectsBadShapesAndArguments) {
  const auto bad = [](auto f) { return oracle::error_of(f).second; };
  KVCacheOptions o;
  EXPECT_NE(bad([&] { KVCache(0, 1, 4, 4, o); }).find("batch"), std::string::npos);
  o.window = -1;
  EXPECT_NE(bad([&] { KVCache(1, 1, 4, 4, o); }).find("window"), std::string::npos);
  o = {};
  o.eps = 0;
  EXPECT_NE(bad([&] { KVCache(1, 1, 4, 4, o); }).find("eps"), std::string::npos);
  o = {};
  o.prune_every = levattn::kMaxPruneEvery + 1;
  EXPECT_NE(bad([&] { KVCache(1, 1, 4, 4, o); }).find("prune_every"), std::string::npos);
  o = {};
  o.leverage.ridge = 1.0;
  EXPECT_NE(bad([&] { KVCache(1, 1, 4, 4, o); }).find("ridge"), std::string::npos);
  o = {};
  KVCache c(1, 2, 4, 3, o);
  const Mat K = oracle::gaussian(2 * 5, 4, 1), V = oracle::gaussian(2 * 5, 3, 2), Q = oracle::gaussian(3, 4, 3);
  std::vector<float> out(64);
  EXPECT_NE(bad([&] { c.attend({Q.v.data(), 1, 2, 1, 4}, out.data()); }).find("before any token"), std::string::npos);
  EXPECT_NE(bad([&] { c.append({K.v.data(), 1, 1, 10, 4}, {V.v.data(), 1, 1, 10, 3}); }).find("keys"), std::string::npos);
  EXPECT_NE(bad([&] { c.append({K.v.data(), 1, 2, 5, 4}, {V.v.data(), 1, 2, 4, 3}); }).find("values"), std::string::npos);
  Mat nan = K;
  nan(7, 2) = NAN;
  EXPECT_NE(bad([&] { c.append({nan.v.data(), 1, 2, 5, 4}, {V.v.data(), 1, 2, 5, 3}); }).find("keys"), std::string::npos);
  EXPECT_EQ(c.tokens(), 0);
  c.append({K.v.data(), 1, 2, 5, 4}, {V.v.data(), 1, 2, 5, 3});
  EXPECT_NE(bad([&] { c.attend({Q.v.data(), 1, 3, 1, 4}, out.data()); }).find("multiple of 2"), std::string::npos);
  EXPECT_EQ(bad([&] { c.attend({Q.v.data(), 1, 2, 1, 4}, out.data()); }), "no error");
}

}  // namespace
