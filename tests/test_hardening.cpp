#include <bit>
// test_hardening.cpp: defects that must stay fixed (independent random streams, every kernel
// path, size checks, normalisers near the null space of K, refused sketches, batched entry
// points, output sets).
#include <gtest/gtest.h>
#include <omp.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "kernels/bf16.hpp"
#include "cases.hpp"
#include "detail/blas.hpp"
#include "detail/rng.hpp"
#include "kernels/elementwise.hpp"

using namespace levattn;
using oracle::Mat;

namespace {

// Sets LEVATTN_ISA for the lifetime of the object.
class IsaOverride {
 public:
  explicit IsaOverride(const std::string& value) {
    const char* old = std::getenv("LEVATTN_ISA");
    if (old) saved_ = old, had_ = true;
    ::setenv("LEVATTN_ISA", value.c_str(), 1);
  }
  ~IsaOverride() {
    if (had_) ::setenv("LEVATTN_ISA", saved_.c_str(), 1);
    else ::unsetenv("LEVATTN_ISA");
  }

 private:
  std::string saved_;
  bool had_ = false;
};

std::vector<kernels::Isa> supported_isas() {
  std::vector<kernels::Isa> out;
  for (kernels::Isa isa : {kernels::Isa::baseline, kernels::Isa::avx2, kernels::Isa::avx512})
    if (kernels::cpu_supports(isa)) out.push_back(isa);
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Random streams.

TEST(RandomStreams, PurposesAndIndicesNeverShareDraws) {
  using detail::CounterRng;
  using detail::Purpose;
  const std::vector<CounterRng> streams = {
      CounterRng(3, Purpose::planted_positions), CounterRng(3, Purpose::random_selection, 0),
      CounterRng(3, Purpose::random_selection, 1), CounterRng(3, Purpose::random_selection, 2),
      CounterRng(3, Purpose::planted_noise), CounterRng(3, Purpose::countsketch)};
  constexpr int kDraws = 20000;
  std::set<std::uint64_t> seen;
  std::vector<std::vector<double>> u(streams.size());
  for (std::size_t s = 0; s < streams.size(); ++s)
    for (int i = 0; i < kDraws; ++i) {
      seen.insert(streams[s].u64(static_cast<std::uint64_t>(i)));
      u[s].push_back(streams[s].uniform(static_cast<std::uint64_t>(i)));
    }
  EXPECT_EQ(seen.size(), streams.size() * kDraws);  // no value repeats across streams
  // Pairwise correlation of the uniforms: sd 1 / sqrt(N) = 0.007 for independent streams.
  for (std::size_t a = 0; a < u.size(); ++a)
    for (std::size_t b = a + 1; b < u.size(); ++b) {
      double sab = 0;
      for (int i = 0; i < kDraws; ++i) sab += (u[a][i] - 0.5) * (u[b][i] - 0.5);
      EXPECT_LT(std::fabs(sab / kDraws * 12.0), 0.035) << a << " " << b;
    }
}

TEST(RandomStreams, RandomSelectionDoesNotReproducePlantedPositions) {
  PlantedOptions po;
  po.n = 1024;
  po.d = 16;
  po.relevant = 8;
  po.seed = 3;
  const PlantedInstance p = planted(po);
  std::vector<float> q, k, v;
  for (int h = 0; h < 3; ++h) {
    q.insert(q.end(), p.Q.data.begin(), p.Q.data.end());
    k.insert(k.end(), p.K.data.begin(), p.K.data.end());
    v.insert(v.end(), p.V.data.begin(), p.V.data.end());
  }
  const Tensor4Ref Q{q.data(), 1, 3, 1024, 16}, K{k.data(), 1, 3, 1024, 16}, V{v.data(), 1, 3, 1024, 16};
  AttentionOptions o;
  o.select = Select::random;
  o.top_k = 8;
  o.seed = 3;
  o.return_selection = true;
  std::vector<float> out(q.size());
  const AttentionResult r = attention(Q, K, V, out.data(), o);
  const std::set<index_t> rel(p.relevant.begin(), p.relevant.end());
  ASSERT_EQ(r.selection.shared_keys.size(), 3u);
  for (const auto& keys : r.selection.shared_keys) {
    index_t overlap = 0;
    for (index_t j : keys) overlap += rel.count(j) ? 1 : 0;
    EXPECT_LE(overlap, 2);  // expected 8 * 8 / 1024 = 0.06
  }
  EXPECT_NE(r.selection.shared_keys[0], r.selection.shared_keys[1]);  // each head its own stream
}

// ---------------------------------------------------------------------------------------------
// Kernel paths: every instruction set the CPU has, the same formulas.

TEST(KernelPaths, RowOperationsMatchFloat64OnEveryIsa) {
  std::mt19937_64 gen(5);
  std::uniform_real_distribution<float> logit(-90.0f, 0.0f);
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    EXPECT_EQ(ops.isa, isa);
    for (index_t n : {0, 1, 7, 8, 15, 16, 17, 33, 64, 67, 512}) {
      std::vector<float> x(static_cast<std::size_t>(n));
      for (float& e : x) e = logit(gen);
      if (n > 3) x[2] = -std::numeric_limits<float>::infinity();  // a masked entry
      std::vector<float> y = x;
      double ref_max = -INFINITY;
      for (float e : x) ref_max = std::max(ref_max, static_cast<double>(e));
      EXPECT_EQ(ops.row_max(x.data(), n), n ? static_cast<float>(ref_max) : -INFINITY) << kernels::to_string(isa) << n;
      const float sum = ops.exp_shift_sum(y.data(), n, 0.0f);
      double ref_sum = 0;
      for (index_t j = 0; j < n; ++j) {
        const double e = x[j] < -87.0f ? 0.0 : std::exp(static_cast<double>(x[j]));
        ref_sum += e;
        EXPECT_NEAR(y[j], e, 2e-7 * e + 1e-45) << kernels::to_string(isa) << " n " << n << " j " << j;
      }
      EXPECT_NEAR(sum, ref_sum, 1e-6 * ref_sum + 1e-30) << kernels::to_string(isa);
      for (float p : {1.0f, 2.0f, 3.0f}) {
        std::vector<float> a = x;
        const float m = ops.abs_row_max(a.data(), n);
        double ref_m = -1;
        for (float e : x) ref_m = std::max(ref_m, std::isinf(e) ? -1.0 : std::fabs(static_cast<double>(e)));
        EXPECT_EQ(m, n ? static_cast<float>(ref_m) : -1.0f);
        if (m <= 0) continue;
        const float s = ops.power_rel_sum(a.data(), n, m, p);
        double ref_s = 0;
        for (float e : x) ref_s += std::isinf(e) ? 0.0 : std::pow(std::fabs(static_cast<double>(e)) / m, p);
        EXPECT_NEAR(s, ref_s, 1e-5 * ref_s) << kernels::to_string(isa) << " p " << p;
      }
    }
  }
}

TEST(KernelPaths, BackwardWeightsAndLogitGradientsMatchFloat64OnEveryIsa) {
  // P = exp(g(s) - L) and dS = P g'(s) (dP - delta) per entry, against float64, with a masked
  // entry (-inf), an exact zero logit (the power kernel's g'(0) is taken as 0) and every tail.
  std::mt19937_64 gen(8);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    for (index_t n : {1, 7, 16, 17, 33, 67, 256})
      for (float power : {0.0f, 1.0f, 2.0f, 3.0f}) {
        std::vector<float> s(static_cast<std::size_t>(n)), dp(s.size());
        for (index_t j = 0; j < n; ++j) s[j] = normal(gen), dp[j] = normal(gen);
        if (n > 3) s[2] = -std::numeric_limits<float>::infinity(), s[3] = 0.0f;
        double L = 0.0;  // the row's log-normaliser over the unmasked entries, as the forward saves it
        for (float e : s)
          if (!std::isinf(e) && (power == 0.0f || e != 0.0f))
            L += power == 0.0f ? std::exp(static_cast<double>(e)) : std::pow(std::fabs(static_cast<double>(e)), power);
        L = std::log(L);
        const float delta = 0.3f;
        std::vector<float> p(s.size()), ds = dp;
        ops.weight_grads(s.data(), p.data(), ds.data(), n, static_cast<float>(L), power, delta);
        for (index_t j = 0; j < n; ++j) {
          const double x = s[j];
          double w = 0.0, g = 0.0;
          if (!std::isinf(x) && (power == 0.0f || x != 0.0)) {
            w = power == 0.0f ? std::exp(x - L) : std::pow(std::fabs(x), power) / std::exp(L);
            g = w * (power == 0.0f ? 1.0 : power / x) * (dp[j] - static_cast<double>(delta));
          }
          const std::string at = kernels::to_string(isa) + " n " + std::to_string(n) + " p " + std::to_string(power) +
                                 " j " + std::to_string(j);
          EXPECT_NEAR(p[j], w, 1e-6 * w + 1e-30) << at;
          EXPECT_NEAR(ds[j], g, 2e-6 * std::fabs(g) + 1e-6 * w * (std::fabs(dp[j]) + 1.0) + 1e-30) << at;
        }
        std::vector<float> same = s, same_ds = dp;  // p aliasing s (the softmax call)
        ops.weight_grads(same.data(), same.data(), same_ds.data(), n, static_cast<float>(L), power, delta);
        EXPECT_EQ(same, p) << kernels::to_string(isa);
        EXPECT_EQ(same_ds, ds) << kernels::to_string(isa);
      }
  }
}

TEST(KernelPaths, GatheredDotsAndScaledScatterMatchFloat64OnEveryIsa) {
  // Rows picked out of order, widths with every tail, against float64 loops.
  std::mt19937_64 gen(9);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    for (index_t d : {1, 7, 16, 17, 33, 64, 100}) {
      const index_t n = 50, ld = d + 3, m = 13;
      std::vector<float> rows(static_cast<std::size_t>(n * ld)), x(static_cast<std::size_t>(d)), w(m);
      for (float& e : rows) e = normal(gen);
      for (float& e : x) e = normal(gen);
      for (float& e : w) e = normal(gen);
      std::vector<index_t> idx(m);
      for (index_t a = 0; a < m; ++a) idx[a] = (a * 17 + 5) % n;  // distinct, out of order
      std::vector<float> dots(m);
      ops.gathered_dots(x.data(), idx.data(), m, rows.data(), ld, d, 0.5f, dots.data());
      std::vector<float> scattered = rows;
      ops.scatter_scaled(w.data(), idx.data(), m, x.data(), scattered.data(), ld, d);
      for (index_t a = 0; a < m; ++a) {
        double ref = 0.0, size = 0.0;
        for (index_t j = 0; j < d; ++j) {
          ref += static_cast<double>(x[j]) * rows[idx[a] * ld + j];
          size += std::fabs(static_cast<double>(x[j]) * rows[idx[a] * ld + j]);
        }
        EXPECT_NEAR(dots[a], 0.5 * ref, 1e-6 * size) << kernels::to_string(isa) << " d " << d << " a " << a;
      }
      std::vector<double> ref(rows.begin(), rows.end());
      for (index_t a = 0; a < m; ++a)
        for (index_t j = 0; j < d; ++j) ref[idx[a] * ld + j] += static_cast<double>(w[a]) * x[j];
      for (std::size_t e = 0; e < ref.size(); ++e)  // other rows and the padding untouched
        EXPECT_NEAR(scattered[e], ref[e], 1e-6 * (std::fabs(ref[e]) + 1.0)) << kernels::to_string(isa) << " d " << d;
    }
  }
}

TEST(KernelPaths, InputScanAndWideningFindEveryNonFiniteEntryOnEveryIsa) {
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    for (index_t n : {1, 7, 16, 17, 40, 1000}) {
      std::vector<float> x(static_cast<std::size_t>(n));
      for (index_t j = 0; j < n; ++j) x[j] = static_cast<float>((j * 37) % 101) - 50.0f;
      float ref = 0;
      for (float v : x) ref = std::max(ref, std::fabs(v));
      EXPECT_EQ(ops.max_abs(x.data(), n), ref) << kernels::to_string(isa) << " n " << n;
      std::vector<double> wide(static_cast<std::size_t>(n));
      EXPECT_TRUE(ops.widen(x.data(), n, wide.data())) << kernels::to_string(isa) << " n " << n;
      EXPECT_EQ(wide, std::vector<double>(x.begin(), x.end())) << kernels::to_string(isa) << " n " << n;
      for (index_t at : {index_t{0}, n / 2, n - 1})  // head, middle (vector part), tail
        for (float bad : {NAN, INFINITY, -INFINITY}) {
          std::vector<float> y = x;
          y[at] = bad;
          EXPECT_EQ(ops.max_abs(y.data(), n), -1.0f) << kernels::to_string(isa) << " n " << n << " at " << at;
          EXPECT_FALSE(ops.widen(y.data(), n, wide.data())) << kernels::to_string(isa) << " n " << n << " at " << at;
        }
    }
  }
}

TEST(KernelPaths, ThresholdCountsAndWindowsAreExactOnEveryIsa) {
  std::mt19937_64 gen(8);
  std::uniform_int_distribution<int> level(-20, 20);  // many ties with the threshold
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    for (index_t n : {0, 1, 7, 8, 15, 16, 17, 33, 63, 64, 65, 512, 1000}) {
      std::vector<float> x(static_cast<std::size_t>(n));
      for (float& e : x) e = 0.25f * static_cast<float>(level(gen));
      if (n > 3) x[1] = -std::numeric_limits<float>::infinity();
      for (float t : {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::max(), -1.0f, 0.0f,
                      0.25f, 6.0f}) {
        index_t ref = 0;
        for (float e : x) ref += e >= t;
        EXPECT_EQ(ops.count_at_least(x.data(), n, t), ref) << kernels::to_string(isa) << " n " << n << " t " << t;
        std::vector<float> between, got(x.size());
        for (float e : x)
          if (e >= t && e < 2.0f) between.push_back(e);
        got.resize(static_cast<std::size_t>(ops.collect_between(x.data(), n, t, 2.0f, got.data())));
        EXPECT_EQ(got, between) << kernels::to_string(isa) << " n " << n << " t " << t;
        std::vector<index_t> above, found(x.size());
        for (index_t j = 0; j < n; ++j)
          if (x[j] > t) above.push_back(j);
        found.resize(static_cast<std::size_t>(ops.indices_above(x.data(), n, t, found.data())));
        EXPECT_EQ(found, above) << kernels::to_string(isa) << " n " << n << " t " << t;
      }
    }
  }
}

// The nearest centroid of k-means: the first index of the largest x[j] - shift[j], ties included
// (few levels), at every length around the vector widths.
TEST(KernelPaths, ShiftedArgmaxIsTheFirstLargestOnEveryIsa) {
  std::mt19937_64 gen(10);
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    for (index_t n : {1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 100, 128}) {
      for (int trial = 0; trial < 20; ++trial) {
        std::vector<float> x(static_cast<std::size_t>(n)), shift(x.size());
        for (index_t j = 0; j < n; ++j)
          x[j] = static_cast<float>(static_cast<int>(gen() % 7)), shift[j] = 0.5f * static_cast<float>(gen() % 3);
        index_t ref = 0;
        for (index_t j = 1; j < n; ++j)
          if (x[j] - shift[j] > x[ref] - shift[ref]) ref = j;
        EXPECT_EQ(ops.argmax_shifted(x.data(), shift.data(), n), ref) << kernels::to_string(isa) << " n " << n;
      }
    }
  }
}

TEST(KernelPaths, GatheredWeightedSumMatchesFloat64OnEveryIsa) {
  std::mt19937_64 gen(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const index_t n = 50, ld = 70;
  std::vector<float> rows(static_cast<std::size_t>(n * ld));
  for (float& e : rows) e = nd(gen);
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    for (index_t dv : {1, 7, 8, 16, 33, 64, 70})
      for (index_t m : {0, 1, 5, 40}) {
        std::vector<float> w(static_cast<std::size_t>(m));
        std::vector<index_t> idx(static_cast<std::size_t>(m));
        for (index_t a = 0; a < m; ++a) w[a] = nd(gen), idx[a] = static_cast<index_t>(gen() % n);
        std::vector<float> acc(static_cast<std::size_t>(dv));
        for (float& e : acc) e = nd(gen);
        std::vector<double> ref(acc.begin(), acc.end());
        for (index_t a = 0; a < m; ++a)
          for (index_t x = 0; x < dv; ++x) ref[x] += static_cast<double>(w[a]) * rows[idx[a] * ld + x];
        ops.gathered_weighted_sum(w.data(), idx.data(), m, rows.data(), ld, dv, acc.data());
        for (index_t x = 0; x < dv; ++x)
          EXPECT_NEAR(acc[x], ref[x], 1e-5 * (1.0 + std::fabs(ref[x])) * static_cast<double>(m + 1))
              << kernels::to_string(isa) << " dv " << dv << " m " << m << " x " << x;
      }
  }
}

TEST(KernelPaths, NarrowProductsAndSmallGramMatchFloat64OnEveryIsa) {
  std::mt19937_64 gen(9);
  std::normal_distribution<float> g;
  for (kernels::Isa isa : supported_isas()) {
    const kernels::RowOps& ops = kernels::row_ops(isa);
    for (index_t count : {1, 3, 8, 13, 16, 31, 32, 64})
      for (index_t d : {1, 5, 16, 40}) {
        const index_t rows = 37;
        std::vector<float> A(rows * d), Bt(d * count), C(rows * count), P(rows * count), V(count * 21);
        for (auto* v : {&A, &Bt, &P, &V})
          for (float& x : *v) x = g(gen);
        ops.narrow_logits(rows, count, d, 0.5f, A.data(), d, Bt.data(), C.data(), count);
        std::vector<float> O(rows * 21, 1.0f);
        ops.narrow_weighted_sum(rows, count, 21, P.data(), count, V.data(), 21, O.data(), 21);
        for (index_t i = 0; i < rows; ++i) {
          for (index_t j = 0; j < count; ++j) {
            double ref = 0, mag = 0;
            for (index_t t = 0; t < d; ++t) {
              ref += static_cast<double>(A[i * d + t]) * Bt[t * count + j];
              mag += std::fabs(static_cast<double>(A[i * d + t]) * Bt[t * count + j]);
            }
            EXPECT_NEAR(C[i * count + j], 0.5 * ref, 1e-6 * mag + 1e-30) << kernels::to_string(isa);
          }
          for (index_t c = 0; c < 21; ++c) {
            double ref = 1.0, mag = 1.0;
            for (index_t j = 0; j < count; ++j) {
              ref += static_cast<double>(P[i * count + j]) * V[j * 21 + c];
              mag += std::fabs(static_cast<double>(P[i * count + j]) * V[j * 21 + c]);
            }
            EXPECT_NEAR(O[i * 21 + c], ref, 1e-6 * mag) << kernels::to_string(isa);
          }
        }
      }
    for (index_t d : {1, 3, 4, 5, 8, 13, 16, 33, 64}) {
      const index_t rows = 29;
      std::vector<double> Y(rows * d), G(d * d, -7.0);
      for (double& y : Y) y = g(gen);
      ops.gram_update(rows, d, Y.data(), 0.0, G.data());
      ops.gram_update(rows, d, Y.data(), 1.0, G.data());  // twice: beta 1 adds
      for (index_t i = 0; i < d; ++i)
        for (index_t j = i; j < d; ++j) {
          double ref = 0;
          for (index_t r = 0; r < rows; ++r) ref += Y[r * d + i] * Y[r * d + j];
          EXPECT_NEAR(G[i * d + j], 2 * ref, 1e-12 * rows * 4) << kernels::to_string(isa) << " d " << d;
        }
    }
  }
}

TEST(KernelPaths, AttentionMatchesTheOracleOnEveryIsa) {
  // 700 keys: BLAS tiles of 512 and 188; 40 keys: one narrow tile.
  for (index_t n : {700, 40})
  for (kernels::Isa isa : supported_isas()) {
    const Mat Q = oracle::gaussian(300, 24, 1), K = oracle::gaussian(n, 24, 2), V = oracle::gaussian(n, 9, 3);
    const IsaOverride use(kernels::to_string(isa));
    EXPECT_EQ(build_info().isa, kernels::to_string(isa));
    for (Kernel kernel : {Kernel::softmax, Kernel::power}) {
      AttentionOptions o;
      o.kernel = kernel;
      o.p = 3.0;
      const std::vector<float> got = attention(Q.view(), K.view(), V.view(), o);
      const double scale = kernel == Kernel::softmax ? 1.0 / std::sqrt(24.0) : 1.0;
      const auto ref = oracle::attention(Q, K, V, kernel == Kernel::softmax, scale, 3.0,
                                         [](index_t, index_t) { return true; });
      EXPECT_LT(oracle::rel_error(got, ref), 2e-5) << kernels::to_string(isa) << " " << to_string(kernel);
    }
  }
}

TEST(KernelPaths, GradientsMatchTheOracleOnEveryIsa) {
  // The backward's row kernel on each instruction set, through the engine: 300 queries (three
  // tiles, so chunks with partial buffers), a shared set with a band, and every key, causal too.
  const AttentionShape sh{1, 2, 300, 300, 24, 9, 2};
  const auto q = oracle::normal(2 * 300 * 24, 11), k = oracle::normal(2 * 300 * 24, 12),
             v = oracle::normal(2 * 300 * 9, 13), dout = oracle::normal(2 * 300 * 9, 14);
  const auto qf = oracle::as<float>(q), kf = oracle::as<float>(k), vf = oracle::as<float>(v);
  const auto gf = oracle::as<float>(dout);
  for (kernels::Isa isa : supported_isas()) {
    const IsaOverride use(kernels::to_string(isa));
    for (const char* spec : {"full", "leverage:16+window:5"})
      for (bool causal : {false, true})
        for (Kernel kernel : {Kernel::softmax, Kernel::power}) {
          AttentionOptions o = parse_selection(spec);
          if (causal && o.select == Select::leverage) o = parse_selection("leverage+eps:0.2+window:5");
          o.causal = causal, o.kernel = kernel, o.p = causal && o.select == Select::leverage ? 2.0 : 3.0;
          const Selection sel = select_keys({qf.data(), 1, 2, 300, 24}, {kf.data(), 1, 2, 300, 24}, o);
          const auto ref = oracle::masked_attention(sh, sel, kernel == Kernel::softmax, o.p, logit_scale(o, 24),
                                                    oracle::as<double>(qf), oracle::as<double>(kf),
                                                    oracle::as<double>(vf), dout);
          std::vector<float> out(ref.out.size()), stat(600), dq(qf.size()), dk(kf.size()), dv(vf.size());
          selected_attention_forward<float>(sh, sel, o, qf.data(), kf.data(), vf.data(), out.data(), stat.data());
          selected_attention_backward<float>(sh, sel, o, qf.data(), kf.data(), vf.data(), out.data(), stat.data(),
                                             gf.data(), dq.data(), dk.data(), dv.data());
          const std::string at = kernels::to_string(isa) + " " + spec + (causal ? " causal " : " ") + to_string(kernel);
          EXPECT_LT(oracle::rel_error(dq, ref.dq), 2e-5) << at;
          EXPECT_LT(oracle::rel_error(dk, ref.dk), 2e-5) << at;
          EXPECT_LT(oracle::rel_error(dv, ref.dv), 2e-5) << at;
        }
  }
}

TEST(KernelPaths, UnknownOrUnsupportedIsaIsAnError) {
  {
    const IsaOverride use("avx9000");
    const auto [kind, msg] = oracle::error_of([] { (void)build_info(); });
    EXPECT_EQ(kind, ErrorKind::invalid_argument);
    EXPECT_NE(msg.find("LEVATTN_ISA"), std::string::npos) << msg;
    const Mat Q = oracle::gaussian(4, 3, 1);
    EXPECT_THROW(attention(Q.view(), Q.view(), Q.view()), Error);
  }
  if (!kernels::cpu_supports(kernels::Isa::avx512)) {
    const IsaOverride use("avx512");
    const auto [kind, msg] = oracle::error_of([] { (void)build_info(); });
    EXPECT_NE(msg.find("does not support"), std::string::npos) << msg;
  }
}

// ---------------------------------------------------------------------------------------------
// Sizes.

TEST(Sizes, ProductsThatOverflowOrExceedMemoryAreRefused) {
  const auto [k1, m1] = oracle::error_of([] { DenseMatrix<float> a(index_t{1} << 32, index_t{1} << 32); });
  EXPECT_EQ(k1, ErrorKind::invalid_argument);
  EXPECT_NE(m1.find("bytes"), std::string::npos) << m1;
  const auto [k2, m2] = oracle::error_of([] { (void)checked_allocation({3000000000, 1000000000}, 4, "x"); });
  EXPECT_EQ(k2, ErrorKind::invalid_argument);
  EXPECT_NE(m2.find("x: needs 1.2e+19 bytes"), std::string::npos) << m2;
  EXPECT_EQ(checked_elements({3, 4, 5}, "x"), 60);
  EXPECT_THROW(checked_elements({3, -4}, "x"), Error);
  EXPECT_THROW(detail::bi(index_t{1} << 40), Error);  // never truncated to a BLAS int
  EXPECT_THROW(detail::li(-1), Error);
  PlantedOptions po;
  po.n = index_t{1} << 32;
  po.d = index_t{1} << 32;
  po.relevant = 1;
  EXPECT_THROW(planted(po), Error);
}

// ---------------------------------------------------------------------------------------------
// Normalisers of queries nearly orthogonal to range(K): Z = ||R q||^2, a sum of squares.

TEST(HeavyEntries, NormalisersNearTheNullSpaceOfK) {
  // Rank-2 keys in d = 3, exactly (third column zero) and in a random plane (rounded to float32).
  Mat plane = oracle::gaussian(200, 3, 7);
  for (index_t i = 0; i < 200; ++i) plane(i, 2) = 0.0f;
  const std::vector<std::pair<std::string, Mat>> keys = {
      {"axis plane", plane}, {"random plane", oracle::product(oracle::gaussian(200, 2, 8), oracle::gaussian(2, 3, 9))}};
  for (const auto& [name, K] : keys) {
    // Queries: a unit normal of the plane plus a component of size 1e-6 .. 1e-2 in it.
    const double n0 = K(0, 1) * K(1, 2) - K(0, 2) * K(1, 1), n1 = K(0, 2) * K(1, 0) - K(0, 0) * K(1, 2),
                 n2 = K(0, 0) * K(1, 1) - K(0, 1) * K(1, 0), nn = std::sqrt(n0 * n0 + n1 * n1 + n2 * n2);
    Mat Q(40, 3);
    std::mt19937_64 gen(11);
    std::normal_distribution<double> g;
    for (index_t i = 0; i < 40; ++i) {
      const double t = std::pow(10.0, -6.0 + 4.0 * static_cast<double>(i) / 39.0);
      Q(i, 0) = static_cast<float>(n0 / nn + t * g(gen));
      Q(i, 1) = static_cast<float>(n1 / nn + t * g(gen));
      Q(i, 2) = static_cast<float>(n2 / nn + t * g(gen));
    }
    const double eps = 0.02;
    std::vector<index_t> zero_ref;
    const auto ref = oracle::heavy_x2(Q, K, eps, &zero_ref);
    const HeavyEntries got = heavy_entries(Q.view(), K.view(), eps);
    EXPECT_EQ(got.zero_rows, zero_ref) << name;  // every row here is well defined
    std::map<std::pair<index_t, index_t>, double> want;
    for (const auto& e : ref) want[{e.i, e.j}] = e.a;
    double worst = 0;
    for (const HeavyEntry& e : got.entries) {
      const auto it = want.find({e.query, e.key});
      if (it == want.end()) continue;
      worst = std::max(worst, std::fabs(e.value - it->second) / it->second);
    }
    index_t missing = 0;
    for (const auto& e : ref)
      if (e.a >= eps * (1 + 1e-6) &&
          std::none_of(got.entries.begin(), got.entries.end(),
                       [&](const HeavyEntry& h) { return h.query == e.i && h.key == e.j; }))
        ++missing;
    EXPECT_EQ(missing, 0) << name;
    EXPECT_LT(worst, 1e-7) << name;  // q^T (K^T K) q was off by 3.7e-4 here
    EXPECT_GT(got.entries.size(), 40u) << name;
  }
  // An exactly orthogonal query has no row.
  Mat q(1, 3);
  q(0, 2) = 1.0f;
  EXPECT_EQ(heavy_entries(q.view(), plane.view(), 0.1).zero_rows, std::vector<index_t>{0});
}

// ---------------------------------------------------------------------------------------------
// Refused requests.

TEST(Refusals, SketchWithFewerRowsThanDAndSketchedExactNormalisers) {
  const Mat K = oracle::gaussian(5000, 64, 3);
  LeverageOptions o;
  o.method = ScoreMethod::sketch;
  o.sketch_size = 10;
  const auto [kind, msg] = oracle::error_of([&] { (void)leverage_scores(K.view(), o); });
  EXPECT_EQ(kind, ErrorKind::invalid_argument);
  EXPECT_NE(msg.find("sketch_size: expected at least d = 64"), std::string::npos) << msg;
  HeavyOptions h;
  h.leverage.method = ScoreMethod::sketch;
  const auto [k2, m2] = oracle::error_of([&] { (void)heavy_entries(K.view(), K.view(), 0.1, h); });
  EXPECT_EQ(k2, ErrorKind::invalid_argument);
  EXPECT_NE(m2.find("method sketch"), std::string::npos) << m2;
  h.normaliser = Normaliser::sampled;  // a sketch with sampled normalisers is a real saving
  EXPECT_NO_THROW((void)heavy_entries(K.view(), K.view(), 0.1, h));
}

// ---------------------------------------------------------------------------------------------
// Batched entry points equal the per-matrix ones.

TEST(Batched, HeavyEntriesAndUniversalSetsPerPair) {
  const index_t b = 2, h = 3, m = 50, n = 120, d = 6;
  const Mat Qs = oracle::gaussian(b * h * m, d, 1), Ks = cases::heavy_tailed(b * h * n, d, 2);
  const Tensor4Ref Q{Qs.v.data(), b, h, m, d}, K{Ks.v.data(), b, h, n, d};
  const std::vector<HeavyEntries> all = heavy_entries(Q, K, 0.05, HeavyOptions{});
  UniversalOptions uo;
  uo.top_k = 9;
  const std::vector<UniversalSet> sets = universal_sets(K, uo);
  ASSERT_EQ(all.size(), 6u);
  ASSERT_EQ(sets.size(), 6u);
  for (index_t p = 0; p < b * h; ++p) {
    const HeavyEntries one = heavy_entries(Q.slice(p / h, p % h), K.slice(p / h, p % h), 0.05);
    ASSERT_EQ(all[p].entries.size(), one.entries.size()) << p;
    for (std::size_t e = 0; e < one.entries.size(); ++e) {
      EXPECT_EQ(all[p].entries[e].key, one.entries[e].key);
      EXPECT_EQ(all[p].entries[e].value, one.entries[e].value);
    }
    EXPECT_EQ(sets[p].indices, universal_set_top_k(leverage_scores(K.slice(p / h, p % h)), 9).indices) << p;
  }
  const Tensor4Ref other{Ks.v.data(), b, h - 1, n, d};
  EXPECT_THROW(heavy_entries(Q, other, 0.05, HeavyOptions{}), Error);
  uo.eps = 0.1;
  EXPECT_THROW(universal_sets(K, uo), Error);  // both eps and top_k
}

// ---------------------------------------------------------------------------------------------
// Output sets: all new files or all the old ones.

TEST(OutputSetTest, CommitReplacesEveryFileAndAFailedStageChangesNothing) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("levattn_set_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const auto read = [](const fs::path& p) {
    std::ifstream f(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  const auto write = [](const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; };
  write(dir / "a.txt", "old a");
  write(dir / "b.txt", "old b");
  {
    OutputSet set;
    set.add_text(dir / "a.txt", "new a");
    set.add_text(dir / "b.txt", "new b");
    set.add_text(dir / "c.txt", "new c");
    set.commit();
  }
  EXPECT_EQ(read(dir / "a.txt"), "new a");
  EXPECT_EQ(read(dir / "c.txt"), "new c");
  fs::create_directories(dir / "d.txt");
  {
    OutputSet set;
    set.add_text(dir / "a.txt", "newer a");
    EXPECT_THROW(set.add_text(dir / "d.txt", "x"), Error);  // a directory: the set is abandoned
    EXPECT_THROW(set.add_text(dir / "a.txt", "again"), Error);  // named twice
  }
  EXPECT_EQ(read(dir / "a.txt"), "new a");
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"a.txt", "b.txt", "c.txt", "d.txt"}));  // no temporaries
  fs::remove_all(dir);
}

// Every Error names its field apart from its detail, so that a front end relabels the field
// (the CLI adds the file an argument came from) without parsing the message.
TEST(Errors, CarryTheirFieldApartFromTheDetail) {
  Mat K = oracle::gaussian(20, 4, 1), Q = oracle::gaussian(5, 4, 2);
  K(3, 1) = std::nanf("");
  const auto caught = [](const std::function<void()>& f) -> Error {
    try {
      f();
    } catch (const Error& e) {
      return e;
    }
    ADD_FAILURE() << "no Error thrown";
    return Error(ErrorKind::internal, "none");
  };
  const Error nan = caught([&] { attention(Q.view(), K.view(), K.view(), AttentionOptions{}); });
  EXPECT_EQ(nan.kind(), ErrorKind::invalid_argument);
  EXPECT_EQ(nan.field(), "keys");
  EXPECT_EQ(nan.detail(), "expected finite values, found nan at row 3, column 1");
  EXPECT_EQ(std::string(nan.what()), "keys: " + nan.detail());
  AttentionOptions o = parse_selection("leverage:4");
  o.window = -3;
  const Error window = caught([&] { attention(Q.view(), K.view(), K.view(), o); });
  EXPECT_EQ(window.field(), "window");
  EXPECT_EQ(std::string(window.what()), "window: expected an integer >= 0 (or -1 for none), got -3");
  const Error plain(ErrorKind::io, "no field here: a message");
  EXPECT_EQ(plain.field(), "");
  EXPECT_EQ(plain.detail(), "no field here: a message");
  const Error copy = window;  // the field survives a copy
  EXPECT_EQ(copy.field(), "window");
}

// Every enum's names read back (parse(to_string(x)) == x), and a wrong name is an error that
// names the field and the choices.
TEST(Names, EveryEnumReadsBackItsOwnNames) {
  for (Kernel x : {Kernel::softmax, Kernel::power}) EXPECT_EQ(parse_kernel(to_string(x)), x);
  for (Select x : {Select::full, Select::leverage, Select::topk, Select::random, Select::window, Select::cluster})
    EXPECT_EQ(parse_select(to_string(x)), x);
  for (ScoreMethod x : {ScoreMethod::exact, ScoreMethod::sketch}) EXPECT_EQ(parse_score_method(to_string(x)), x);
  for (SketchKind x : {SketchKind::countsketch, SketchKind::srht, SketchKind::gaussian})
    EXPECT_EQ(parse_sketch_kind(to_string(x)), x);
  for (Normaliser x : {Normaliser::exact, Normaliser::sampled}) EXPECT_EQ(parse_normaliser(to_string(x)), x);
  for (HeavySearch x : {HeavySearch::exact, HeavySearch::countsketch}) EXPECT_EQ(parse_heavy_search(to_string(x)), x);
  for (ReduceMethod x : {ReduceMethod::gaussian, ReduceMethod::srht, ReduceMethod::countsketch, ReduceMethod::svd,
                         ReduceMethod::bss})
    EXPECT_EQ(parse_reduce_method(to_string(x)), x);
  for (DType x : {DType::float32, DType::float64, DType::int64}) EXPECT_EQ(parse_dtype(to_string(x)), x);
  for (ErrorKind x : {ErrorKind::invalid_argument, ErrorKind::io, ErrorKind::internal})
    EXPECT_EQ(parse_error_kind(to_string(x)), x);
  const auto [kind, what] = oracle::error_of([] { parse_dtype("float16"); });
  EXPECT_EQ(kind, ErrorKind::invalid_argument);
  EXPECT_EQ(what, "dtype: expected float32, float64 or int64, got 'float16'");
}

// bfloat16 products (kernels/bf16.hpp): rounding to nearest even, the pair layouts, and sums of
// exact products in float32, against the same bfloat16 inputs decoded and summed in float64.
namespace {

float from_bf16(std::uint32_t h) { return std::bit_cast<float>(h << 16); }

}  // namespace

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(kernels::to_bf16(1.0f), 0x3f80u);
  EXPECT_EQ(kernels::to_bf16(-2.0f), 0xc000u);
  EXPECT_EQ(kernels::to_bf16(std::bit_cast<float>(0x3f808000u)), 0x3f80u);  // a tie: to the even 0x3f80
  EXPECT_EQ(kernels::to_bf16(std::bit_cast<float>(0x3f818000u)), 0x3f82u);  // a tie: to the even 0x3f82
  EXPECT_EQ(kernels::to_bf16(std::bit_cast<float>(0x3f808001u)), 0x3f81u);  // above the tie: up
  EXPECT_EQ(kernels::to_bf16(std::bit_cast<float>(0x3f807fffu)), 0x3f80u);  // below: down
}

TEST(Bf16, PairLayoutsAndProductsAreExactOnTheRoundedInputs) {
  if (!kernels::bf16_available()) GTEST_SKIP() << "this CPU has no AVX512_BF16";
  std::mt19937_64 gen(13);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (index_t rows : {1, 2, 3, 5, 16, 35}) {
    for (index_t cols : {1, 2, 15, 16, 17, 31, 32, 33, 64, 65, 600}) {
      const index_t ld = cols + 3, pairs = (cols + 1) / 2;
      std::vector<float> x(static_cast<std::size_t>(rows * ld));
      for (float& e : x) e = nd(gen);
      const auto half = [&](index_t r, index_t c) -> std::uint32_t { return c < cols ? kernels::to_bf16(x[r * ld + c]) : 0u; };
      std::vector<std::uint32_t> along(static_cast<std::size_t>(rows * pairs)), ref(along.size());
      kernels::bf16_pairs_along_rows(x.data(), rows, cols, ld, along.data());
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < pairs; ++t) ref[r * pairs + t] = half(r, 2 * t + 1) << 16 | half(r, 2 * t);
      EXPECT_EQ(along, ref) << rows << " x " << cols;
      std::vector<std::uint32_t> transposed(along.size()), ref_t(along.size());
      kernels::bf16_pairs_transposed(x.data(), rows, cols, ld, transposed.data());
      for (index_t r = 0; r < rows; ++r)
        for (index_t t = 0; t < pairs; ++t) ref_t[t * rows + r] = ref[r * pairs + t];
      EXPECT_EQ(transposed, ref_t) << rows << " x " << cols;
      const index_t down_pairs = (rows + 1) / 2;
      std::vector<std::uint32_t> down(static_cast<std::size_t>(down_pairs * cols)), ref_d(down.size());
      kernels::bf16_pairs_down_columns(x.data(), rows, cols, ld, down.data());
      for (index_t t = 0; t < down_pairs; ++t)
        for (index_t c = 0; c < cols; ++c)
          ref_d[t * cols + c] = (2 * t + 1 < rows ? half(2 * t + 1, c) : 0u) << 16 | half(2 * t, c);
      EXPECT_EQ(down, ref_d) << rows << " x " << cols;
    }
  }
  for (index_t rows : {1, 3, 4, 5, 9})
    for (index_t n : {1, 15, 16, 17, 31, 32, 33, 64, 70})
      for (index_t pairs : {1, 7, 32, 40})
        for (float beta : {0.0f, 1.0f}) {
          const index_t lda = pairs + 1, ldb = n + 2, ldc = n + 5;
          std::vector<std::uint32_t> A(static_cast<std::size_t>(rows * lda)), B(static_cast<std::size_t>(pairs * ldb));
          for (auto& e : A) e = std::uint32_t{kernels::to_bf16(nd(gen))} << 16 | kernels::to_bf16(nd(gen));
          for (auto& e : B) e = std::uint32_t{kernels::to_bf16(nd(gen))} << 16 | kernels::to_bf16(nd(gen));
          std::vector<float> C(static_cast<std::size_t>(rows * ldc));
          for (float& e : C) e = nd(gen);
          const std::vector<float> before = C;
          kernels::bf16_gemm(rows, n, pairs, 0.125f, beta, A.data(), lda, B.data(), ldb, C.data(), ldc);
          for (index_t r = 0; r < rows; ++r)
            for (index_t j = 0; j < ldc; ++j) {
              if (j >= n) {  // outside C's columns: untouched
                EXPECT_EQ(C[r * ldc + j], before[r * ldc + j]);
                continue;
              }
              double s = 0.0, size = 0.0;
              for (index_t t = 0; t < pairs; ++t) {
                const std::uint32_t a = A[r * lda + t], b = B[t * ldb + j];
                const double lo = static_cast<double>(from_bf16(a & 0xffffu)) * from_bf16(b & 0xffffu);
                const double hi = static_cast<double>(from_bf16(a >> 16)) * from_bf16(b >> 16);
                s += lo + hi, size += std::fabs(lo) + std::fabs(hi);
              }
              const double ref = 0.125 * s + (beta != 0.0f ? before[r * ldc + j] : 0.0);
              // Each sum of 2 pairs exact products rounds at most 2 pairs + 2 times in float32.
              const double bound = static_cast<double>(2 * pairs + 2) * 0x1p-24 * (0.125 * size + std::fabs(before[r * ldc + j]));
              EXPECT_NEAR(C[r * ldc + j], ref, bound)
                  << rows << " x " << n << " pairs " << pairs << " beta " << beta;
            }
        }
}
