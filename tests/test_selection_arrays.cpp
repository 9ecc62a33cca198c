// The selection as fixed-size arrays (key_segments / selection_from_arrays, the PyTorch op's
// form) and the selection spec (selection_spec / parse_selection): every selector's selection
// comes back attending exactly the same (query, key) pairs, with the layout selection_layout
// predicts from the shape and options alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::AttentionOptions;
using levattn::AttentionShape;
using levattn::index_t;
using levattn::Selection;

// size N(0, 1) draws in float32.
std::vector<float> normal(std::size_t size, std::uint64_t seed) { return oracle::as<float>(oracle::normal(size, seed)); }

struct Case {
  std::string spec;
  bool causal;
};

class SelectionArrays : public ::testing::TestWithParam<Case> {};

TEST_P(SelectionArrays, RoundTripAttendsTheSamePairsWithThePredictedLayout) {
  // 600 queries: three causal segments of 256; sizes not multiples of the kernels' tiles.
  const AttentionShape sh{2, 3, 600, 600, 8, 8};
  const std::vector<float> q = normal(static_cast<std::size_t>(2 * 3 * 600 * 8), 1);
  std::vector<float> k = normal(q.size(), 2);
  // A few large keys so that the leverage sets differ between pairs and segments.
  for (index_t r = 0; r < 2 * 3 * 600; r += 97)
    for (index_t c = 0; c < 8; ++c) k[r * 8 + c] *= 6.0f;
  AttentionOptions o = levattn::parse_selection(GetParam().spec);
  o.causal = GetParam().causal;
  const Selection s = levattn::select_keys({q.data(), 2, 3, 600, 8}, {k.data(), 2, 3, 600, 8}, o);

  const Selection layout = levattn::selection_layout(sh, o);
  EXPECT_EQ(layout.batch, s.batch);
  EXPECT_EQ(layout.heads, s.heads);
  EXPECT_EQ(layout.m, s.m);
  EXPECT_EQ(layout.n, s.n);
  EXPECT_EQ(layout.all_keys, s.all_keys);
  EXPECT_EQ(layout.causal, s.causal);
  EXPECT_EQ(layout.segment, s.segment);
  EXPECT_EQ(layout.window, s.window);
  EXPECT_EQ(layout.top_k, s.top_k);

  const std::vector<index_t> segs = levattn::key_segments(s);
  ASSERT_EQ(static_cast<index_t>(segs.size()), s.pairs() * s.n);
  const Selection back = levattn::selection_from_arrays(layout, segs.data(), s.query_keys.data());
  index_t attended = 0;
  std::vector<char> mine(static_cast<std::size_t>(s.n)), theirs(mine.size());
  for (index_t h = 0; h < s.pairs(); ++h)
    for (index_t i = 0; i < s.m; ++i) {
      s.mask_row(h, i, mine.data());
      back.mask_row(h, i, theirs.data());
      ASSERT_EQ(theirs, mine) << "pair " << h << " query " << i;
      attended += std::count(mine.begin(), mine.end(), 1);
    }
  EXPECT_GT(attended, 0);
  EXPECT_EQ(back.keys_per_query(), s.keys_per_query());
}

INSTANTIATE_TEST_SUITE_P(
    EverySelector, SelectionArrays,
    ::testing::Values(Case{"full", false}, Case{"full", true}, Case{"leverage:24+window:3+sinks:2", false},
                      Case{"leverage+eps:0.02+sinks:300", false}, Case{"leverage+eps:0.05+window:4+sinks:2", true},
                      Case{"leverage+eps:0.05+sinks:300", true}, Case{"topk:7", false}, Case{"topk:7", true},
                      Case{"random:20+seed:3+window:1", false}, Case{"random:20+sinks:4", true},
                      Case{"window:5+sinks:3", false}, Case{"window:5", true},
                      Case{"cluster:6+window:1+sinks:2+eps:0.05", false}, Case{"cluster:6+window:2", true}),
    [](const auto& test) {
      std::string name = test.param.spec + (test.param.causal ? "_causal" : "");
      for (char& c : name)
        if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
      return name;
    });

TEST(SelectionArrays, BadArraysAreInvalidArguments) {
  AttentionOptions o = levattn::parse_selection("leverage+eps:0.1");
  o.causal = true;
  const Selection layout = levattn::selection_layout({1, 1, 600, 600, 4, 4}, o);
  std::vector<index_t> segs(600, -1);
  segs[10] = 3;  // only segments 0 .. 2 exist
  EXPECT_THROW(levattn::selection_from_arrays(layout, segs.data(), nullptr), levattn::Error);
  segs[10] = -1, segs[300] = 0;  // key 300 belongs to segment 1: segment 0 cannot hold it
  EXPECT_THROW(levattn::selection_from_arrays(layout, segs.data(), nullptr), levattn::Error);
  segs[300] = -2;
  EXPECT_THROW(levattn::selection_from_arrays(layout, segs.data(), nullptr), levattn::Error);
  segs[300] = 1;
  EXPECT_NO_THROW(levattn::selection_from_arrays(layout, segs.data(), nullptr));
  EXPECT_THROW(levattn::selection_layout({1, 1, 600, 500, 4, 4}, o), levattn::Error);  // causal needs m == n
}

// Grouped-query attention: 6 query heads over 2 kv heads read in place give what the kv heads
// repeated per query head give, and the kv heads' gradients are the group sums.
TEST(GroupedQueryAttention, EqualsRepeatedKeysForwardAndBackward) {
  const index_t batch = 2, heads = 6, kv = 2, n = 300, d = 8, group = heads / kv;
  const std::vector<float> q = normal(static_cast<std::size_t>(batch * heads * n * d), 3);
  const std::vector<float> k = normal(static_cast<std::size_t>(batch * kv * n * d), 4);
  const std::vector<float> v = normal(k.size(), 5);
  std::vector<float> kr(q.size()), vr(q.size());  // repeated: query head h gets kv head h / group
  for (index_t b = 0; b < batch; ++b)
    for (index_t h = 0; h < heads; ++h)
      for (index_t x = 0; x < n * d; ++x) {
        kr[(b * heads + h) * n * d + x] = k[(b * kv + h / group) * n * d + x];
        vr[(b * heads + h) * n * d + x] = v[(b * kv + h / group) * n * d + x];
      }
  for (const char* spec : {"full", "leverage:16+window:2+sinks:1", "topk:5", "cluster:4+window:1", "random:9"}) {
    AttentionOptions o = levattn::parse_selection(spec);
    // attention(): the same bits as with the repeated keys.
    std::vector<float> out(q.size()), ref(q.size());
    levattn::attention({q.data(), batch, heads, n, d}, {k.data(), batch, kv, n, d}, {v.data(), batch, kv, n, d},
                       out.data(), o);
    levattn::attention({q.data(), batch, heads, n, d}, {kr.data(), batch, heads, n, d},
                       {vr.data(), batch, heads, n, d}, ref.data(), o);
    EXPECT_EQ(out, ref) << spec;
    // The differentiable pair.
    const Selection s = levattn::select_keys({q.data(), batch, heads, n, d}, {k.data(), batch, kv, n, d}, o);
    const AttentionShape grouped{batch, heads, n, n, d, d, kv}, repeated{batch, heads, n, n, d, d};
    std::vector<float> o1(q.size()), o2(q.size()), st1(static_cast<std::size_t>(batch * heads * n)), st2(st1.size());
    levattn::selected_attention_forward<float>(grouped, s, o, q.data(), k.data(), v.data(), o1.data(), st1.data());
    levattn::selected_attention_forward<float>(repeated, s, o, q.data(), kr.data(), vr.data(), o2.data(), st2.data());
    EXPECT_EQ(o1, o2) << spec;
    const std::vector<float> dout = normal(q.size(), 6);
    std::vector<float> dq1(q.size()), dk1(k.size()), dv1(v.size()), dq2(q.size()), dk2(q.size()), dv2(q.size());
    levattn::selected_attention_backward<float>(grouped, s, o, q.data(), k.data(), v.data(), o1.data(), st1.data(),
                                                dout.data(), dq1.data(), dk1.data(), dv1.data());
    levattn::selected_attention_backward<float>(repeated, s, o, q.data(), kr.data(), vr.data(), o2.data(), st2.data(),
                                                dout.data(), dq2.data(), dk2.data(), dv2.data());
    EXPECT_EQ(dq1, dq2) << spec;
    for (index_t b = 0; b < batch; ++b)
      for (index_t g = 0; g < kv; ++g)
        for (index_t x = 0; x < n * d; ++x) {
          float sk = 0.0f, sv = 0.0f;  // the group's sum in ascending order of query head
          for (index_t h = g * group; h < (g + 1) * group; ++h) {
            sk += dk2[(b * heads + h) * n * d + x];
            sv += dv2[(b * heads + h) * n * d + x];
          }
          ASSERT_EQ(dk1[(b * kv + g) * n * d + x], sk) << spec;
          ASSERT_EQ(dv1[(b * kv + g) * n * d + x], sv) << spec;
        }
  }
  // kv heads that do not divide the query heads are refused.
  std::vector<float> out(q.size());
  EXPECT_THROW(levattn::attention({q.data(), batch, heads, n, d}, {k.data(), batch, 4, n / 2, d},
                                  {v.data(), batch, 4, n / 2, d}, out.data(), {}),
               levattn::Error);
  EXPECT_THROW(levattn::selection_layout({batch, heads, n, n, d, d, 4}, {}), levattn::Error);
}

// Key padding: every selector, given a key mask, selects no masked key, attends none (window
// bands and full included), counts them in no query's keys, and its attention equals the dense
// softmax over exactly the pairs mask_row() names; attention() refuses a mask.
TEST(KeyMask, NoSelectorSelectsOrAttendsAMaskedKey) {
  const index_t batch = 3, heads = 2, n = 300, d = 8, pairs = batch * heads;
  const std::vector<float> q = normal(static_cast<std::size_t>(pairs * n * d), 7);
  std::vector<float> k = normal(q.size(), 8);
  const std::vector<float> v = normal(q.size(), 9);
  std::vector<std::uint8_t> mask(static_cast<std::size_t>(batch * n), 1);
  std::mt19937_64 g(10);
  for (index_t j = 200; j < n; ++j) mask[j] = 0;                      // batch 0: right padding
  for (index_t j = 0; j < 70; ++j) mask[n + j] = 0;                    // batch 1: left padding
  for (index_t j = 0; j < n; ++j) mask[2 * n + j] = g() % 2 ? 1 : 0;  // batch 2: holes
  for (index_t r = 0; r < pairs * n; ++r)                              // masked keys made heavy
    if (!mask[(r / n / heads) * n + r % n])
      for (index_t c = 0; c < d; ++c) k[r * d + c] *= 20.0f;
  for (const auto& [spec, causal] : std::vector<std::pair<const char*, bool>>{
           {"full", false}, {"full", true}, {"leverage:12+window:2+sinks:3", false}, {"leverage+eps:0.05", false},
           {"leverage+eps:0.05+window:2+sinks:2", true}, {"topk:5", false}, {"topk:5", true}, {"random:20+sinks:1", false},
           {"window:3+sinks:2", false}, {"cluster:4+window:1+sinks:1", false}, {"cluster:4", true}}) {
    AttentionOptions o = levattn::parse_selection(spec);
    o.causal = causal;
    o.key_mask = mask.data();
    const Selection s = levattn::select_keys({q.data(), batch, heads, n, d}, {k.data(), batch, heads, n, d}, o);
    ASSERT_EQ(s.key_mask, mask) << spec;
    const AttentionShape sh{batch, heads, n, n, d, d};
    std::vector<float> out(q.size()), stat(static_cast<std::size_t>(pairs * n));
    levattn::selected_attention_forward<float>(sh, s, o, q.data(), k.data(), v.data(), out.data(), stat.data());
    const std::vector<index_t> per_query = s.keys_per_query();
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    double worst = 0.0;
    for (index_t h = 0; h < pairs; ++h)
      for (index_t i = 0; i < n; ++i) {
        std::vector<double> w(static_cast<std::size_t>(n), 0.0);
        double top = -1e300, sum = 0.0;
        index_t count = 0;
        std::vector<char> attends(static_cast<std::size_t>(n));
        s.mask_row(h, i, attends.data());
        for (index_t j = 0; j < n; ++j) {
          if (!attends[j]) continue;
          ASSERT_TRUE(mask[(h / heads) * n + j]) << spec << ": pair " << h << " query " << i << " attends masked key " << j;
          double dot = 0.0;
          for (index_t c = 0; c < d; ++c) dot += static_cast<double>(q[(h * n + i) * d + c]) * k[(h * n + j) * d + c];
          w[j] = dot * scale, top = std::max(top, w[j]), ++count;
        }
        ASSERT_EQ(per_query[h * n + i], count) << spec;
        for (index_t j = 0; j < n; ++j)
          if (attends[j]) sum += (w[j] = std::exp(w[j] - top));
        for (index_t c = 0; c < d; ++c) {
          double o_ref = 0.0;
          for (index_t j = 0; j < n; ++j)
            if (attends[j]) o_ref += w[j] / sum * v[(h * n + j) * d + c];
          worst = std::max(worst, std::abs(o_ref - out[(h * n + i) * d + c]));
        }
      }
    EXPECT_LT(worst, 1e-4) << spec;
    // The arrays carry no mask: with the same mask given back, the same selection.
    Selection back = levattn::selection_from_arrays(levattn::selection_layout(sh, o), levattn::key_segments(s).data(),
                                                    s.query_keys.data());
    back.key_mask = mask;
    EXPECT_EQ(back.keys_per_query(), per_query) << spec;
    // attention() takes the mask as well: the same selection, the same output (cluster's fused
    // search and attention included).
    o.return_selection = true;
    std::vector<float> direct(q.size());
    const levattn::AttentionResult r = levattn::attention({q.data(), batch, heads, n, d}, {k.data(), batch, heads, n, d},
                                                          {v.data(), batch, heads, n, d}, direct.data(), o);
    EXPECT_TRUE(r.selection == s) << spec;
    double apart = 0.0;
    for (std::size_t e = 0; e < out.size(); ++e) apart = std::max(apart, static_cast<double>(std::fabs(direct[e] - out[e])));
    EXPECT_LT(apart, 1e-5) << spec;
  }
}

TEST(SelectionSpec, EveryFieldRoundTripsExactly) {
  AttentionOptions o;
  o.select = levattn::Select::cluster;
  o.top_k = 17, o.eps = 0.1 + 0.2, o.window = 0, o.sinks = 3, o.probe = 5, o.clusters = 40, o.cluster_iterations = 3;
  o.seed = 123456789012345ULL, o.kernel = levattn::Kernel::power, o.p = 1.0 / 3.0;
  o.budget_alpha = 0.7, o.budget_exponent = 0.45;
  o.leverage.method = levattn::ScoreMethod::sketch, o.leverage.ridge = 1e-300, o.leverage.rank_rtol = 3e-7;
  o.leverage.sketch = levattn::SketchKind::srht, o.leverage.sketch_size = 99, o.leverage.gamma = 0.15;
  o.leverage.jl_columns = 7, o.leverage.delta = 0.02, o.leverage.seed = 5;
  const std::string spec = levattn::selection_spec(o);
  const AttentionOptions b = levattn::parse_selection(spec);
  EXPECT_EQ(levattn::selection_spec(b), spec);
  EXPECT_EQ(b.select, o.select);
  EXPECT_EQ(b.top_k, o.top_k);
  EXPECT_EQ(b.eps, o.eps);  // exactly: 0.30000000000000004
  EXPECT_EQ(b.window, o.window);
  EXPECT_EQ(b.sinks, o.sinks);
  EXPECT_EQ(b.probe, o.probe);
  EXPECT_EQ(b.clusters, o.clusters);
  EXPECT_EQ(b.cluster_iterations, o.cluster_iterations);
  EXPECT_EQ(b.seed, o.seed);
  EXPECT_EQ(b.kernel, o.kernel);
  EXPECT_EQ(b.p, o.p);
  EXPECT_EQ(b.budget_alpha, o.budget_alpha);
  EXPECT_EQ(b.budget_exponent, o.budget_exponent);
  EXPECT_EQ(b.leverage.method, o.leverage.method);
  EXPECT_EQ(b.leverage.ridge, o.leverage.ridge);
  EXPECT_EQ(b.leverage.rank_rtol, o.leverage.rank_rtol);
  EXPECT_EQ(b.leverage.sketch, o.leverage.sketch);
  EXPECT_EQ(b.leverage.sketch_size, o.leverage.sketch_size);
  EXPECT_EQ(b.leverage.gamma, o.leverage.gamma);
  EXPECT_EQ(b.leverage.jl_columns, o.leverage.jl_columns);
  EXPECT_EQ(b.leverage.delta, o.leverage.delta);
  EXPECT_EQ(b.leverage.seed, o.leverage.seed);
  EXPECT_EQ(levattn::selection_spec(AttentionOptions{}), "full");  // defaults are left out
  // The canonical spec: the budget as the name's value, other fields in a fixed order.
  for (const auto& [given, canonical] :
       std::vector<std::pair<std::string, std::string>>{{"leverage:32+window:4", "leverage:32+window:4"},
                                                        {"leverage+window:4+top_k:32", "leverage:32+window:4"},
                                                        {"window+window:16+sinks:2", "window:16+sinks:2"},
                                                        {"window+sinks:2", "window+sinks:2"},
                                                        {"topk+top_k:9+window:3", "topk:9+window:3"},
                                                        {"cluster:8+eps:0.5+probe:2", "cluster:8+eps:0.5+probe:2"},
                                                        {"full+top_k:5", "full+top_k:5"},
                                                        {"full", "full"}}) {
    EXPECT_EQ(levattn::selection_spec(levattn::parse_selection(given)), canonical) << given;
    EXPECT_EQ(levattn::selection_spec(levattn::parse_selection(canonical)), canonical) << canonical;
  }
}

TEST(SelectionSpec, BadFieldsNameTheSpec) {
  for (const char* bad : {"leverage+method:fast", "leverage+sketch:dct", "leverage+sketch_seed:-1", "leverage+gamma:x",
                          "cluster+iterations:1.5", "leverage+nothing:1"}) {
    try {
      levattn::parse_selection(bad);
      ADD_FAILURE() << bad << " parsed";
    } catch (const levattn::Error& e) {
      EXPECT_NE(std::string(e.what()).find(bad), std::string::npos) << e.what();
      EXPECT_EQ(e.kind(), levattn::ErrorKind::invalid_argument);
    }
  }
}

}  // namespace
