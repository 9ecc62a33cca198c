// The residual part of a selection (math.md 1.8): keys sampled uniformly from what a selection
// drops, weighted by |R_i| / r. Checked against brute-force rests, the exact normaliser and
// numerator (unbiasedness over seeds, the closed-form variance of sampling without replacement
// and the x^2 bound), the dense weighted oracle (forward and gradients) and exact attention when
// the whole rest is drawn.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::AttentionOptions;
using levattn::AttentionShape;
using levattn::index_t;
using levattn::Kernel;
using levattn::Select;
using levattn::Selection;
using levattn::Tensor4Ref;
using oracle::as;
using oracle::normal;
using oracle::rel_error;

// Inputs of one shape: float32 copies for the selection (select_keys reads float32).
struct Inputs {
  AttentionShape sh;
  std::vector<double> q, k, v, dout;
  std::vector<float> qf, kf;
  Inputs(const AttentionShape& s, std::uint64_t seed) : sh(s) {
    const index_t pairs = sh.batch * sh.heads, kv = sh.batch * sh.kv();
    q = normal(pairs * sh.m * sh.d, seed), k = normal(kv * sh.n * sh.d, seed + 1);
    v = normal(kv * sh.n * sh.dv, seed + 2), dout = normal(pairs * sh.m * sh.dv, seed + 3);
    qf = as<float>(q), kf = as<float>(k);
  }
  Tensor4Ref Q() const { return {qf.data(), sh.batch, sh.heads, sh.m, sh.d}; }
  Tensor4Ref K() const { return {kf.data(), sh.batch, sh.kv(), sh.n, sh.d}; }
};

AttentionOptions spec(const std::string& text, bool causal = false) {
  AttentionOptions o = levattn::parse_selection(text);
  o.causal = causal;
  return o;
}

// The rest of query i of pair h by brute force: open keys (j <= i if causal) the selection's other
// parts do not attend.
std::vector<index_t> rest_of(const Selection& s, index_t h, index_t i) {
  Selection kept = s;
  kept.residual = 0, kept.residual_keys.clear(), kept.residual_weight.clear();
  std::vector<index_t> rest;
  for (index_t j = 0; j < s.n; ++j)
    if (!oracle::attends(kept, h, i, j) && s.key_open(h, j) && !(s.causal && j > i)) rest.push_back(j);
  return rest;
}

// The rest a residual block draws from, by brute force: open keys, below the block's last query
// + 1 if causal, outside the shared set of its first query i0.
std::vector<index_t> block_rest(const Selection& s, index_t h, index_t i0, index_t last) {
  std::vector<index_t> rest;
  const std::vector<index_t>& shared = s.shared_of(h, i0);
  for (index_t j = 0; j < (s.causal ? last + 1 : s.n); ++j)
    if (s.key_open(h, j) && std::find(shared.begin(), shared.end(), j) == shared.end()) rest.push_back(j);
  return rest;
}

TEST(Residual, BlocksDrawDistinctKeysOfTheirRestWithTheirWeight) {
  std::vector<std::uint8_t> mask(2 * 530, 1);
  for (index_t j = 0; j < 530; j += 7) mask[static_cast<std::size_t>(530 + j)] = 0;  // batch 1 pads every 7th key
  const std::pair<const char*, bool> specs[] = {
      {"leverage:24+window:3+sinks:2+residual:16", false}, {"topk:9+residual:16", false},
      {"random:420+residual:40", false},  // a rest under a quarter of the keys: drawn from its enumeration
      {"random:30+residual:600", false},  // more slots than the rest: all of it, weight 1
      {"leverage+eps:0.05+window:5+residual:16", true}, {"cluster:8+residual:12", false},
      {"cluster:5+window:2+residual:30", true}};
  for (const auto& [text, causal] : specs) {
    SCOPED_TRACE(text);
    const index_t m = causal ? 530 : 300;
    const Inputs in(AttentionShape{2, 2, m, 530, 12, 7}, 11);
    AttentionOptions o = spec(text, causal);
    o.key_mask = mask.data();
    const Selection s = levattn::select_keys(in.Q(), in.K(), o);
    ASSERT_EQ(s.residual, std::min(o.residual, s.n));
    ASSERT_EQ(s.residual_blocks(), causal ? 3 : 2);  // causal leverage: segments of 256 = blocks; else m / 256
    const std::vector<index_t> kept = s.keys_per_query();
    std::vector<char> row(static_cast<std::size_t>(s.n));
    for (index_t h = 0; h < s.pairs(); ++h)
      for (index_t b = 0; b < s.residual_blocks(); ++b) {
        const index_t i0 = b * levattn::kResidualBlock, last = std::min(m, i0 + levattn::kResidualBlock) - 1;
        const std::vector<index_t> rest = block_rest(s, h, i0, last);
        const index_t* slots = s.residual_keys.data() + (h * s.residual_blocks() + b) * s.residual;
        const index_t count = std::count_if(slots, slots + s.residual, [](index_t j) { return j >= 0; });
        ASSERT_EQ(count, std::min<index_t>(s.residual, static_cast<index_t>(rest.size()))) << h << " " << b;
        ASSERT_TRUE(std::all_of(slots + count, slots + s.residual, [](index_t j) { return j == -1; }));
        ASSERT_TRUE(std::adjacent_find(slots, slots + count, std::greater_equal<>()) == slots + count);  // ascending
        for (index_t a = 0; a < count; ++a) ASSERT_TRUE(std::binary_search(rest.begin(), rest.end(), slots[a]));
        const double expected = count == 0 ? 1.0 : static_cast<double>(rest.size()) / static_cast<double>(count);
        ASSERT_DOUBLE_EQ(s.residual_weight[static_cast<std::size_t>(h * s.residual_blocks() + b)], expected);
        // Each query attends exactly the keys of weight > 0 (mask_row, keys_per_query).
        for (index_t i = i0; i <= last; i += 37) {
          s.mask_row(h, i, row.data());
          index_t weighted = 0;
          for (index_t j = 0; j < s.n; ++j) {
            const bool w = oracle::key_weight(s, h, i, j) > 0.0;
            weighted += w ? 1 : 0;
            ASSERT_EQ(row[static_cast<std::size_t>(j)] != 0, w) << "query " << i << " key " << j;
          }
          ASSERT_EQ(kept[static_cast<std::size_t>(h * m + i)], weighted) << "query " << i;
        }
      }
  }
}

// Every key of the rest is drawn with probability r / |U|: the counts over many seeds pass a
// chi-square test against the uniform, on the rejection path (a large rest) and on the
// enumeration path (a rest under a quarter of the keys).
TEST(Residual, EachKeyOfTheRestIsEquallyLikely) {
  for (const char* text : {"leverage:8", "random:200+seed:11"}) {
    SCOPED_TRACE(text);
    const Inputs in(AttentionShape{1, 1, 1, 256, 8, 4}, 21);
    const Selection kept = levattn::select_keys(in.Q(), in.K(), spec(text));
    std::vector<double> count(256, 0.0);
    constexpr int kSeeds = 3000;
    for (int seed = 0; seed < kSeeds; ++seed) {
      Selection s = kept;
      levattn::sample_residual(s, 5, static_cast<std::uint64_t>(seed));
      for (index_t j : s.residual_keys) count[static_cast<std::size_t>(j)] += 1.0;
    }
    const std::vector<index_t> rest = rest_of(kept, 0, 0);
    const double expected = kSeeds * 5.0 / static_cast<double>(rest.size());
    double chi2 = 0.0;
    for (index_t j : rest)
      chi2 += (count[static_cast<std::size_t>(j)] - expected) * (count[static_cast<std::size_t>(j)] - expected) / expected;
    // Keys outside the rest are never drawn.
    double in_rest = 0.0;
    for (index_t j : rest) in_rest += count[static_cast<std::size_t>(j)];
    EXPECT_DOUBLE_EQ(in_rest, kSeeds * 5.0);
    const double dof = static_cast<double>(rest.size() - 1);
    EXPECT_LT(chi2, dof + 5.0 * std::sqrt(2.0 * dof)) << "chi-square " << chi2 << " on " << dof;
    EXPECT_GT(chi2, dof - 5.0 * std::sqrt(2.0 * dof)) << "chi-square " << chi2 << " on " << dof;
  }
}

// The exact normaliser Z_i = sum_j f(s_ij) and numerator N_i = sum_j f(s_ij) v_j of every query,
// over all keys (float64, by brute force).
struct Exact {
  std::vector<double> z, num;
};
Exact exact_sums(const Inputs& in, bool softmax, double p, double scale, bool causal = false) {
  const AttentionShape& sh = in.sh;
  Exact e{std::vector<double>(static_cast<std::size_t>(sh.m)), std::vector<double>(static_cast<std::size_t>(sh.m * sh.dv))};
  for (index_t i = 0; i < sh.m; ++i)
    for (index_t j = 0; j < (causal ? i + 1 : sh.n); ++j) {
      double s = 0.0;
      for (index_t x = 0; x < sh.d; ++x) s += in.q[i * sh.d + x] * in.k[j * sh.d + x];
      const double f = softmax ? std::exp(scale * s) : std::pow(std::fabs(scale * s), p);
      e.z[i] += f;
      for (index_t x = 0; x < sh.dv; ++x) e.num[i * sh.dv + x] += f * in.v[j * sh.dv + x];
    }
  return e;
}

// Over many seeds, the engine's normaliser exp(stat) and numerator out exp(stat) average to the
// exact Z and N of every query within 5 standard errors: softmax and x^2, and a causal selection
// with a window and own keys, whose queries' rests are smaller than their blocks'.
TEST(Residual, NormaliserAndNumeratorAreUnbiased) {
  struct Case {
    const char* spec;
    bool causal;
    AttentionShape sh;
  };
  const Case cases[] = {{"leverage:16+residual:12", false, {1, 1, 16, 600, 8, 3}},
                        {"leverage:16+residual:12+kernel:poly+p:2", false, {1, 1, 16, 600, 8, 3}},
                        {"cluster:3+window:2+residual:12", true, {1, 1, 300, 300, 8, 3}}};
  for (const Case& c : cases) {
    SCOPED_TRACE(c.spec);
    const Inputs in(c.sh, 31);
    AttentionOptions o = spec(c.spec, c.causal);
    const bool softmax = o.kernel == Kernel::softmax;
    const Exact e = exact_sums(in, softmax, 2.0, softmax ? 1.0 / std::sqrt(8.0) : 1.0, c.causal);
    constexpr int kSeeds = 600;
    const index_t m = in.sh.m, dv = in.sh.dv;
    std::vector<double> sum(static_cast<std::size_t>(m * (dv + 1))), sq(sum.size());
    AttentionOptions kept = o;
    kept.residual = 0;
    const Selection selection = levattn::select_keys(in.Q(), in.K(), kept);
    for (int seed = 0; seed < kSeeds; ++seed) {
      Selection s = selection;
      levattn::sample_residual(s, o.residual, static_cast<std::uint64_t>(seed));
      std::vector<double> out(static_cast<std::size_t>(m * dv)), stat(static_cast<std::size_t>(m));
      levattn::selected_attention_forward<double>(in.sh, s, o, in.q.data(), in.k.data(), in.v.data(), out.data(),
                                                  stat.data());
      for (index_t i = 0; i < m; ++i) {
        const double z = std::exp(stat[i]);
        for (index_t x = 0; x <= dv; ++x) {
          const double est = x == dv ? z : out[i * dv + x] * z;
          sum[i * (dv + 1) + x] += est, sq[i * (dv + 1) + x] += est * est;
        }
      }
    }
    for (index_t i = 0; i < m; ++i)
      for (index_t x = 0; x <= dv; ++x) {
        const double mean = sum[i * (dv + 1) + x] / kSeeds;
        const double var = std::max(0.0, sq[i * (dv + 1) + x] / kSeeds - mean * mean);
        const double exact = x == dv ? e.z[i] : e.num[i * dv + x];
        EXPECT_LE(std::fabs(mean - exact), 5.0 * std::sqrt(var / kSeeds) + 1e-12 * std::fabs(exact))
            << "query " << i << (x == dv ? " normaliser" : " numerator");
      }
  }
}

TEST(Residual, OutputErrorFallsLikeOneOverSqrtR) {
  const Inputs in(AttentionShape{1, 1, 64, 4096, 8, 4}, 41);
  const Exact e = exact_sums(in, true, 2.0, 1.0 / std::sqrt(8.0));
  std::vector<double> rms;
  for (const index_t r : {8, 32, 128}) {
    AttentionOptions o = spec("leverage:16+residual:" + std::to_string(r));
    double err = 0.0;
    for (int seed = 0; seed < 60; ++seed) {
      o.seed = static_cast<std::uint64_t>(seed);
      const Selection s = levattn::select_keys(in.Q(), in.K(), o);
      std::vector<double> o64(static_cast<std::size_t>(64 * 4)), stat(64);
      levattn::selected_attention_forward<double>(in.sh, s, o, in.q.data(), in.k.data(), in.v.data(), o64.data(),
                                                  stat.data());
      for (index_t i = 0; i < 64; ++i)
        for (index_t x = 0; x < 4; ++x) {
          const double exact = e.num[i * 4 + x] / e.z[i];
          err += (o64[i * 4 + x] - exact) * (o64[i * 4 + x] - exact);
        }
    }
    rms.push_back(std::sqrt(err));
  }
  // Four times the samples: half the error (the ratio estimator's bias is O(1/r), smaller still).
  for (std::size_t a = 0; a + 1 < rms.size(); ++a) {
    EXPECT_GT(rms[a] / rms[a + 1], 1.6) << a;
    EXPECT_LT(rms[a] / rms[a + 1], 2.5) << a;
  }
}

// r at least the rest: every key of it with weight 1, which is attention over all keys (causal:
// all keys j <= i; padding keys excluded), in float64 and float32.
TEST(Residual, SamplingTheWholeRestIsExactAttention) {
  for (const bool causal : {false, true}) {
    SCOPED_TRACE(causal ? "causal" : "bidirectional");
    const Inputs in(AttentionShape{2, 2, 130, causal ? 130 : 300, 8, 5}, 51);
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(2 * in.sh.n), 1);
    for (index_t j = 3; j < in.sh.n; j += 11) mask[static_cast<std::size_t>(j)] = 0;
    AttentionOptions o = spec("leverage:10+window:2+residual:400", causal);
    if (causal) o.select = Select::random, o.top_k = 10;  // causal leverage takes eps; random cuts at i
    o.key_mask = mask.data();
    const Selection s = levattn::select_keys(in.Q(), in.K(), o);
    Selection all;
    all.batch = 2, all.heads = 2, all.m = in.sh.m, all.n = in.sh.n, all.all_keys = true, all.causal = causal;
    all.key_mask = s.key_mask;
    const double scale = 1.0 / std::sqrt(8.0);
    const oracle::MaskedAttention ref = oracle::masked_attention(in.sh, all, true, 2.0, scale, in.q, in.k, in.v, in.dout);
    std::vector<double> out(ref.out.size()), stat(static_cast<std::size_t>(4 * in.sh.m));
    levattn::selected_attention_forward<double>(in.sh, s, o, in.q.data(), in.k.data(), in.v.data(), out.data(), stat.data());
    EXPECT_LT(rel_error(out, ref.out), 1e-12);
    EXPECT_TRUE(std::all_of(s.residual_weight.begin(), s.residual_weight.end(), [](double w) { return w == 1.0; }));
    std::vector<float> out32(ref.out.size());
    const auto vf = as<float>(in.v);
    levattn::attention(in.Q(), in.K(), {vf.data(), 2, 2, in.sh.n, 5}, out32.data(), o);
    EXPECT_LT(rel_error(out32, ref.out), 2e-5);
  }
}

// x^2 with U_eps kept: every dropped entry is below eps Z, so the normaliser's relative standard
// deviation is at most sqrt(|R| eps / r) (math.md 1.8). Adversarial keys put the rest's mass on a
// few entries just under eps Z (a direction shared by 1.1 / eps keys, each of leverage about
// eps / 1.1, so none is kept), which comes close to the bound. The variance over seeds matches
// the closed form of sampling without replacement, |R|^2 (1 - r / |R|) S^2 / r (S^2 the rest's
// sample variance of f), which is below the bound.
TEST(Residual, X2VarianceBoundHoldsOnAdversarialInputs) {
  const index_t n = 2048, d = 16, dv = 2, r = 32;
  const double eps = 0.02;
  const index_t shared = static_cast<index_t>(std::ceil(1.1 / eps));  // keys along e_0
  Inputs in(AttentionShape{1, 1, 4, n, d, dv}, 61);
  for (index_t j = 0; j < n; ++j)
    for (index_t x = 0; x < d; ++x) {
      double& kx = in.k[j * d + x];
      if (j < shared) kx = x == 0 ? 1.0 : 0.0;
      else kx = x == 0 ? 0.0 : 0.05 * kx;  // small keys orthogonal to e_0
    }
  for (index_t i = 0; i < 4; ++i)
    for (index_t x = 0; x < d; ++x) in.q[i * d + x] = x == 0 ? 1.0 : 0.01 * in.q[i * d + x];
  in.qf = as<float>(in.q), in.kf = as<float>(in.k);
  AttentionOptions o = spec("leverage+eps:0.02+kernel:poly+p:2+residual:" + std::to_string(r));
  const Exact e = exact_sums(in, false, 2.0, 1.0);
  constexpr int kSeeds = 2000;
  for (index_t i = 0; i < 4; ++i) {
    const Selection s0 = levattn::select_keys(in.Q(), in.K(), o);
    const std::vector<index_t> rest = rest_of(s0, 0, i);
    std::vector<double> f;
    for (index_t j : rest) {
      double dot = 0.0;
      for (index_t x = 0; x < d; ++x) dot += in.q[i * d + x] * in.k[j * d + x];
      f.push_back(dot * dot);
    }
    const double R = static_cast<double>(rest.size());
    const double mean_f = std::accumulate(f.begin(), f.end(), 0.0) / R;
    double s2 = 0.0, sum_sq = 0.0;
    for (double x : f) s2 += (x - mean_f) * (x - mean_f), sum_sq += x * x;
    s2 /= R - 1.0;
    ASSERT_LT(*std::max_element(f.begin(), f.end()), eps * e.z[i]) << "a dropped entry is eps-heavy";
    const double closed_form = R * R * (1.0 - r / R) * s2 / r, bound = R / r * sum_sq;
    EXPECT_LE(closed_form, bound);
    EXPECT_LE(std::sqrt(bound) / e.z[i], std::sqrt(R * eps / r));
    std::vector<double> z;
    for (int seed = 0; seed < kSeeds; ++seed) {
      o.seed = static_cast<std::uint64_t>(seed);
      const Selection s = levattn::select_keys(in.Q(), in.K(), o);
      std::vector<double> out(static_cast<std::size_t>(4 * dv)), stat(4);
      levattn::selected_attention_forward<double>(in.sh, s, o, in.q.data(), in.k.data(), in.v.data(), out.data(),
                                                  stat.data());
      z.push_back(std::exp(stat[i]));
    }
    const double mz = std::accumulate(z.begin(), z.end(), 0.0) / kSeeds;
    double var = 0.0;
    for (double x : z) var += (x - mz) * (x - mz);
    var /= kSeeds - 1;
    // The sample variance of 2000 draws is within about 10% of the true one here.
    EXPECT_NEAR(var / closed_form, 1.0, 0.2) << "query " << i;
    EXPECT_LE(std::sqrt(var) / e.z[i], 1.1 * std::sqrt(R * eps / r)) << "query " << i;
    // Adversarial: the bound is nearly reached.
    EXPECT_GT(std::sqrt(closed_form) / e.z[i], 0.5 * std::sqrt(R * eps / r)) << "query " << i;
  }
}

// Forward and gradients over selections with a residual part equal the dense masked-and-weighted
// float64 computation (each sampled key's kernel value times its weight): shared sets with a
// window, own keys, causal segments, grouped-query heads and padding, softmax and |x|^p; float32
// to its rounding.
TEST(Residual, GradientsMatchTheDenseWeightedOracle) {
  struct Case {
    const char* spec;
    bool causal;
    AttentionShape sh;
  };
  const Case cases[] = {
      {"leverage:24+window:3+sinks:2+residual:20", false, {2, 2, 300, 530, 12, 7}},
      {"topk:9+residual:30", false, {1, 4, 200, 300, 12, 7, 2}},
      {"leverage+eps:0.05+residual:25", true, {1, 2, 530, 530, 12, 7}},
      {"random:20+window:4+residual:15+kernel:poly+p:3", false, {2, 2, 150, 400, 12, 7}},
      {"topk:6+residual:10+kernel:poly+p:2", true, {1, 2, 300, 300, 12, 7}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.spec);
    const Inputs in(c.sh, 71);
    std::vector<std::uint8_t> mask(static_cast<std::size_t>(c.sh.batch * c.sh.n), 1);
    for (index_t j = 5; j < c.sh.n; j += 13) mask[static_cast<std::size_t>(j)] = 0;
    AttentionOptions o = spec(c.spec, c.causal);
    o.key_mask = mask.data();
    const Selection s = levattn::select_keys(in.Q(), in.K(), o);
    ASSERT_GT(s.residual, 0);
    const bool softmax = o.kernel == Kernel::softmax;
    const double scale = softmax ? 1.0 / std::sqrt(12.0) : 1.0;
    const oracle::MaskedAttention ref = oracle::masked_attention(c.sh, s, softmax, o.p, scale, in.q, in.k, in.v, in.dout);
    const index_t rows = c.sh.batch * c.sh.heads * c.sh.m;
    {
      std::vector<double> out(ref.out.size()), stat(static_cast<std::size_t>(rows)), dq(in.q.size()), dk(in.k.size()),
          dv(in.v.size());
      levattn::selected_attention_forward<double>(c.sh, s, o, in.q.data(), in.k.data(), in.v.data(), out.data(), stat.data());
      levattn::selected_attention_backward<double>(c.sh, s, o, in.q.data(), in.k.data(), in.v.data(), out.data(),
                                                   stat.data(), in.dout.data(), dq.data(), dk.data(), dv.data());
      EXPECT_LT(rel_error(out, ref.out), 1e-11);
      EXPECT_LT(rel_error(dq, ref.dq), 1e-11) << "dq";
      EXPECT_LT(rel_error(dk, ref.dk), 1e-11) << "dk";
      EXPECT_LT(rel_error(dv, ref.dv), 1e-11) << "dv";
    }
    const auto q = as<float>(in.q), k = as<float>(in.k), v = as<float>(in.v), g = as<float>(in.dout);
    std::vector<float> out(ref.out.size()), stat(static_cast<std::size_t>(rows)), dq(q.size()), dk(k.size()), dv(v.size());
    levattn::selected_attention_forward<float>(c.sh, s, o, q.data(), k.data(), v.data(), out.data(), stat.data());
    levattn::selected_attention_backward<float>(c.sh, s, o, q.data(), k.data(), v.data(), out.data(), stat.data(),
                                                g.data(), dq.data(), dk.data(), dv.data());
    EXPECT_LT(rel_error(out, ref.out), 3e-5);
    EXPECT_LT(rel_error(dq, ref.dq), 3e-4) << "dq";
    EXPECT_LT(rel_error(dk, ref.dk), 3e-4) << "dk";
    EXPECT_LT(rel_error(dv, ref.dv), 3e-4) << "dv";
    // attention() makes the same selection and attends it as the engine does.
    std::vector<float> direct(out.size());
    levattn::attention(in.Q(), in.K(), {v.data(), c.sh.batch, c.sh.kv(), c.sh.n, c.sh.dv}, direct.data(), o);
    EXPECT_EQ(direct, out);
  }
}

// The draws, the output and the gradients are the same bits at 1, 2, 4 and 8 threads.
TEST(Residual, SameBitsForAnyThreadCount) {
  const Inputs in(AttentionShape{2, 2, 700, 900, 16, 8}, 81);
  const AttentionOptions o = spec("leverage:32+window:8+residual:64");
  const auto v = as<float>(in.v), g = as<float>(in.dout), q = as<float>(in.q), k = as<float>(in.k);
  const auto runs = oracle::at_each_thread_count([&] {
    const Selection s = levattn::select_keys(in.Q(), in.K(), o);
    std::vector<float> out(g.size()), stat(static_cast<std::size_t>(4 * 700)), dq(q.size()), dk(k.size()), dv(v.size());
    levattn::selected_attention_forward<float>(in.sh, s, o, q.data(), k.data(), v.data(), out.data(), stat.data());
    levattn::selected_attention_backward<float>(in.sh, s, o, q.data(), k.data(), v.data(), out.data(), stat.data(),
                                                g.data(), dq.data(), dk.data(), dv.data());
    return std::make_tuple(s, out, dq, dk, dv);
  });
  for (std::size_t t = 1; t < runs.size(); ++t) EXPECT_TRUE(runs[t] == runs[0]) << oracle::kThreadCounts[t] << " threads";
}

TEST(Residual, NamesAndArraysRoundTrip) {
  const AttentionOptions o = levattn::parse_selection("leverage:32+window:4+residual:64");
  EXPECT_EQ(o.residual, 64);
  EXPECT_EQ(levattn::selection_spec(o), "leverage:32+window:4+residual:64");
  const Inputs in(AttentionShape{1, 2, 100, 300, 8, 4}, 91);
  const Selection s = levattn::select_keys(in.Q(), in.K(), o);
  const Selection layout = levattn::selection_layout(in.sh, o);
  EXPECT_EQ(layout.residual, 64);
  const std::vector<index_t> segs = levattn::key_segments(s);
  const Selection back = levattn::selection_from_arrays(layout, segs.data(), nullptr, s.residual_keys.data(),
                                                        s.residual_weight.data());
  EXPECT_TRUE(back == s);
}

TEST(Residual, RefusesWhatItCannotSample) {
  const Inputs in(AttentionShape{1, 1, 20, 50, 4, 2}, 101);
  const auto field_of = [](const std::function<void()>& f) { return oracle::error_of(f).second; };
  EXPECT_NE(field_of([&] { levattn::select_keys(in.Q(), in.K(), spec("full+residual:4")); }).find("residual"),
            std::string::npos);
  EXPECT_NE(field_of([&] { levattn::select_keys(in.Q(), in.K(), spec("topk:3+residual:-1")); }).find("residual"),
            std::string::npos);
  Selection s = levattn::select_keys(in.Q(), in.K(), spec("topk:3+residual:4"));
  EXPECT_NE(field_of([&] { levattn::sample_residual(s, 4, 0); }).find("already"), std::string::npos);
  Selection none = levattn::select_keys(in.Q(), in.K(), spec("topk:3"));
  EXPECT_NE(field_of([&] { levattn::sample_residual(none, 0, 0); }).find("residual"), std::string::npos);
  // The engine refuses a residual part that breaks the rules: a repeated own key, a bad weight.
  const std::vector<double> q(20 * 4, 0.5), k(50 * 4, 0.25), v(50 * 2, 1.0);
  std::vector<double> out(20 * 2), stat(20);
  const auto attend = [&](const Selection& bad) {
    return field_of([&] {
      levattn::selected_attention_forward<double>(in.sh, bad, AttentionOptions{}, q.data(), k.data(), v.data(),
                                                  out.data(), stat.data());
    });
  };
  Selection descending = s;
  std::swap(descending.residual_keys[0], descending.residual_keys[1]);
  EXPECT_NE(attend(descending).find("ascending"), std::string::npos);
  Selection shared = levattn::select_keys(in.Q(), in.K(), spec("leverage:3+residual:4"));
  shared.residual_keys[0] = shared.shared_keys[0][0];
  std::fill(shared.residual_keys.begin() + 1, shared.residual_keys.begin() + 4, -1);
  EXPECT_NE(attend(shared).find("outside its shared set"), std::string::npos);
  Selection weightless = s;
  weightless.residual_weight[0] = 0.0;
  EXPECT_NE(attend(weightless).find("weight"), std::string::npos);
  Selection short_weights = s;
  short_weights.residual_weight.pop_back();
  EXPECT_NE(attend(short_weights).find("sampled keys"), std::string::npos);
}

}  // namespace
