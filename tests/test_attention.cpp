#include <gtest/gtest.h>
#include <omp.h>

#include <set>

#include "cases.hpp"

using namespace levattn;
using oracle::Mat;

namespace {

struct Inputs {
  Mat Q, K, V;
};

Inputs random_inputs(index_t m, index_t n, index_t d, index_t dv, std::uint64_t seed) {
  return {oracle::gaussian(m, d, seed), oracle::gaussian(n, d, seed + 1), oracle::gaussian(n, dv, seed + 2)};
}

std::vector<float> run(const Inputs& in, const AttentionOptions& o, AttentionResult* r = nullptr) {
  return attention(in.Q.view(), in.K.view(), in.V.view(), o, r);
}

double default_scale(const AttentionOptions& o, index_t d) {
  return !std::isnan(o.scale) ? o.scale : (o.kernel == Kernel::softmax ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0);
}

// Runs the selection and compares with the naive computation masked to the returned selection.
void expect_masked_equal(const Inputs& in, AttentionOptions o, const std::string& what) {
  o.return_selection = true;
  AttentionResult r;
  const std::vector<float> got = run(in, o, &r);
  const index_t n = in.K.rows;
  std::set<index_t> shared;
  if (!r.selection.shared_keys.empty()) shared.insert(r.selection.shared_keys[0].begin(), r.selection.shared_keys[0].end());
  // Per-query keys (topk, cluster: -1 marks an unused slot) besides the shared keys and window.
  const index_t k = r.selection.query_keys.empty() ? 0 : static_cast<index_t>(r.selection.query_keys.size()) / in.Q.rows;
  if (o.select == Select::topk) {
    EXPECT_EQ(k, std::min(o.top_k, n)) << what;
  }
  const auto mask = [&](index_t i, index_t j) {
    if (o.select == Select::full) return true;
    for (index_t c = 0; c < k; ++c)
      if (r.selection.query_keys[i * k + c] == j) return true;
    if (shared.count(j)) return true;
    return o.window >= 0 && j >= i - o.window && j <= i + o.window;
  };
  const auto ref = oracle::attention(in.Q, in.K, in.V, o.kernel == Kernel::softmax,
                                     default_scale(o, in.Q.cols), o.p, mask);
  EXPECT_LT(oracle::rel_error(got, ref), 1e-5) << what;
}

}  // namespace

TEST(Attention, FullEqualsNaiveDense) {
  for (index_t n : {1, 7, 513, 1100}) {
    const Inputs in = random_inputs(300, n, 16, 12, static_cast<std::uint64_t>(n));
    AttentionOptions o;
    expect_masked_equal(in, o, "softmax n=" + std::to_string(n));
    o.scale = 0.7;
    expect_masked_equal(in, o, "softmax scale 0.7");
    o.kernel = Kernel::power;
    o.scale = std::nan("");
    for (double p : {1.0, 2.0, 1.5, 3.0}) {
      o.p = p;
      expect_masked_equal(in, o, "power p=" + std::to_string(p) + " n=" + std::to_string(n));
    }
  }
}

TEST(Attention, EverySelectionEqualsNaiveMaskedComputation) {
  const Inputs in = random_inputs(400, 700, 8, 5, 31);
  for (Kernel kernel : {Kernel::softmax, Kernel::power}) {
    AttentionOptions o;
    o.kernel = kernel;
    o.select = Select::leverage;
    o.eps = 0.01;
    expect_masked_equal(in, o, "leverage eps");
    o.eps = 0;
    o.top_k = 40;
    expect_masked_equal(in, o, "leverage top-k");
    o.window = 3;
    o.sinks = 4;
    expect_masked_equal(in, o, "leverage + window + sinks");
    o.select = Select::window;
    o.top_k = 0;
    expect_masked_equal(in, o, "window + sinks");
    o.sinks = 0;
    o.window = 300;  // wider than a query block
    expect_masked_equal(in, o, "wide window");
    o.window = 0;
    expect_masked_equal(in, o, "window 0 (the diagonal)");
    o.window = -1;
    o.select = Select::topk;
    o.top_k = 17;
    expect_masked_equal(in, o, "topk");
    o.top_k = 5000;  // more than n: every key
    expect_masked_equal(in, o, "topk k > n");
    o.select = Select::random;
    o.top_k = 64;
    o.sinks = 2;
    o.window = 1;
    expect_masked_equal(in, o, "random + window + sinks");
    o.select = Select::cluster;
    o.top_k = 24;
    expect_masked_equal(in, o, "cluster + window + sinks");
    o.window = -1, o.sinks = 0, o.eps = 0.01, o.probe = 3;
    expect_masked_equal(in, o, "cluster + U_eps");
    o.eps = 0, o.top_k = 900;  // more than the candidates: unused slots
    expect_masked_equal(in, o, "cluster k > candidates");
  }
}

TEST(Attention, LeverageSelectionIsTheUniversalSet) {
  const Inputs in = random_inputs(50, 600, 6, 4, 41);
  AttentionOptions o;
  o.select = Select::leverage;
  o.eps = 0.02;
  o.sinks = 3;
  o.return_selection = true;
  AttentionResult r;
  run(in, o, &r);
  std::vector<index_t> expected = universal_set(in.K.view(), 0.02).indices;
  for (index_t j = 0; j < 3; ++j) expected.push_back(j);
  std::sort(expected.begin(), expected.end());
  expected.erase(std::unique(expected.begin(), expected.end()), expected.end());
  EXPECT_EQ(r.selection.shared_keys.at(0), expected);
  EXPECT_EQ(r.shared_sizes.at(0), static_cast<index_t>(expected.size()));
}

TEST(Attention, PowerKernelSelectsByItsOwnSensitivityBounds) {
  const Inputs in = random_inputs(40, 500, 5, 3, 45);
  for (double p : {1.0, 3.0}) {
    AttentionOptions o;
    o.kernel = Kernel::power;
    o.p = p;
    o.select = Select::leverage;
    o.eps = 0.03;
    o.return_selection = true;
    AttentionResult r;
    run(in, o, &r);
    EXPECT_EQ(r.selection.shared_keys.at(0), universal_set(sensitivity_bounds(in.K.view(), p), 0.03).indices) << p;
    EXPECT_NE(r.selection.shared_keys.at(0), universal_set(in.K.view(), 0.03).indices) << p;  // not the x^2 set
    expect_masked_equal(in, o, "power p=" + std::to_string(p) + " over its universal set");
  }
}

TEST(Attention, TopKMatchesExhaustiveRanking) {
  const Inputs in = random_inputs(64, 300, 8, 4, 51);
  AttentionOptions o;
  o.select = Select::topk;
  o.top_k = 9;
  o.return_selection = true;
  AttentionResult r;
  run(in, o, &r);
  for (index_t i = 0; i < 64; ++i) {
    std::vector<std::pair<double, index_t>> s;
    for (index_t j = 0; j < 300; ++j) s.push_back({-oracle::dot(in.Q, i, in.K, j), j});
    std::sort(s.begin(), s.end());
    std::vector<index_t> top(9);
    for (index_t c = 0; c < 9; ++c) top[c] = s[c].second;
    std::sort(top.begin(), top.end());  // written ascending
    for (index_t c = 0; c < 9; ++c) EXPECT_EQ(r.selection.query_keys[i * 9 + c], top[c]) << "query " << i;
  }
}

TEST(Attention, RandomSelectionIsReproducibleAndUniform) {
  const Inputs in = random_inputs(10, 1000, 4, 4, 61);
  AttentionOptions o;
  o.select = Select::random;
  o.top_k = 100;
  o.seed = 7;
  o.return_selection = true;
  AttentionResult a, b, c;
  const auto oa = run(in, o, &a);
  const auto runs = oracle::at_each_thread_count([&] {
    AttentionResult r;
    auto out = run(in, o, &r);
    return std::make_pair(out, r.selection.shared_keys);
  });
  for (const auto& r : runs) {
    EXPECT_EQ(r.first, oa);  // bit for bit
    EXPECT_EQ(r.second, a.selection.shared_keys);
  }
  ASSERT_EQ(a.selection.shared_keys[0].size(), 100u);
  EXPECT_TRUE(std::is_sorted(a.selection.shared_keys[0].begin(), a.selection.shared_keys[0].end()));
  o.seed = 8;
  run(in, o, &c);
  EXPECT_NE(a.selection.shared_keys, c.selection.shared_keys);
  // Uniformity: over many seeds every tenth of the keys gets about a tenth of the draws.
  std::vector<int> bins(10, 0);
  for (std::uint64_t seed = 0; seed < 200; ++seed) {
    o.seed = seed;
    run(in, o, &c);
    for (index_t j : c.selection.shared_keys[0]) ++bins[j / 100];
  }
  for (int count : bins) EXPECT_NEAR(count, 2000, 200);
}

TEST(Attention, BatchedAndMultiHeadShapesMatchPerHead) {
  const index_t B = 2, H = 3, m = 70, n = 90, d = 8, dv = 6;
  const Mat Q = oracle::gaussian(B * H * m, d, 71), K = oracle::gaussian(B * H * n, d, 72),
            V = oracle::gaussian(B * H * n, dv, 73);
  for (Select sel : {Select::full, Select::leverage, Select::topk, Select::random}) {
    AttentionOptions o;
    o.select = sel;
    o.top_k = sel == Select::full ? 0 : 11;
    o.window = sel == Select::leverage ? 2 : -1;
    std::vector<float> out(static_cast<std::size_t>(B * H * m * dv));
    const AttentionResult r = attention(Tensor4Ref{Q.v.data(), B, H, m, d}, Tensor4Ref{K.v.data(), B, H, n, d},
                                        Tensor4Ref{V.v.data(), B, H, n, dv}, out.data(), o);
    ASSERT_EQ(r.shared_sizes.size(), static_cast<std::size_t>(B * H));
    for (index_t h = 0; h < B * H; ++h) {
      AttentionOptions oh = o;
      oh.seed = o.seed;
      // A random selection is drawn per (batch, head) stream; compare the deterministic ones.
      if (sel == Select::random) continue;
      const std::vector<float> one =
          attention(ConstMatrix{Q.v.data() + h * m * d, m, d}, ConstMatrix{K.v.data() + h * n * d, n, d},
                    ConstMatrix{V.v.data() + h * n * dv, n, dv}, oh);
      for (index_t t = 0; t < m * dv; ++t)
        ASSERT_NEAR(out[h * m * dv + t], one[t], 1e-6) << to_string(sel) << " head " << h;
    }
  }
}

TEST(Attention, SoftmaxStaysFiniteForHugeLogits) {
  Inputs in = random_inputs(20, 300, 4, 3, 81);
  for (auto& x : in.Q.v) x *= 100.0f;  // logits of order 1e4 with scale 1
  for (auto& x : in.K.v) x *= 100.0f;
  for (Select sel : {Select::full, Select::leverage}) {
    AttentionOptions o;
    o.scale = 1.0;
    o.select = sel;
    o.top_k = sel == Select::leverage ? 30 : 0;
    AttentionResult r;
    const std::vector<float> out = run(in, o, &r);
    for (float x : out) ASSERT_TRUE(std::isfinite(x));
    EXPECT_EQ(r.empty_rows, 0);
    expect_masked_equal(in, o, "huge logits");
  }
}

TEST(Attention, ZeroNormaliserRowsGiveZeroOutput) {
  Inputs in = random_inputs(6, 40, 3, 2, 91);
  for (index_t j = 0; j < 3; ++j) in.Q(2, j) = 0;  // |0|^p = 0 for every key
  AttentionOptions o;
  o.kernel = Kernel::power;
  AttentionResult r;
  const std::vector<float> out = run(in, o, &r);
  EXPECT_EQ(r.empty_rows, 1);
  EXPECT_EQ(out[4], 0.0f);
  EXPECT_EQ(out[5], 0.0f);
  // An eps so large that U is empty: every row is empty.
  o.select = Select::leverage;
  o.eps = 1.0;
  const Inputs flat = random_inputs(6, 400, 3, 2, 92);
  run(flat, o, &r);
  EXPECT_EQ(r.shared_sizes[0], 0);
  EXPECT_EQ(r.empty_rows, 6);
}

TEST(Attention, RejectsBadInput) {
  const Inputs in = random_inputs(10, 20, 4, 3, 101);
  const auto message = [&](const AttentionOptions& o, const Inputs& x) {
    try {
      run(x, o);
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::invalid_argument);
      return std::string(e.what());
    }
    return std::string("no error");
  };
  AttentionOptions o;
  o.select = Select::leverage;
  EXPECT_NE(message(o, in).find("exactly one"), std::string::npos);
  o.eps = 1.5;
  EXPECT_NE(message(o, in).find("eps"), std::string::npos);
  o.eps = 0.1;
  o.top_k = 3;
  EXPECT_NE(message(o, in).find("exactly one"), std::string::npos);
  o = {};
  o.kernel = Kernel::power;
  o.p = 0;
  EXPECT_NE(message(o, in).find("p:"), std::string::npos);
  o = {};
  o.window = 2;
  EXPECT_NE(message(o, in).find("window"), std::string::npos);
  o = {};
  o.select = Select::topk;
  EXPECT_NE(message(o, in).find("top_k"), std::string::npos);
  o = {};
  o.top_k = 5;  // full attention takes no budget
  EXPECT_NE(message(o, in).find("top_k"), std::string::npos);
  o = {};
  o.select = Select::topk;
  o.top_k = 5;
  o.eps = 0.1;  // eps belongs to leverage
  EXPECT_NE(message(o, in).find("eps"), std::string::npos);
  o = {};
  o.scale = std::numeric_limits<double>::infinity();
  EXPECT_NE(message(o, in).find("scale"), std::string::npos);
  o = {};
  Inputs bad = in;
  bad.V(3, 1) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_NE(message(o, bad).find("values"), std::string::npos);
  Inputs wrong = in;
  wrong.V = oracle::gaussian(19, 3, 1);
  EXPECT_NE(message(o, wrong).find("values"), std::string::npos);
  Inputs huge = in;
  for (auto& x : huge.Q.v) x = 1e30f;
  for (auto& x : huge.K.v) x = 1e30f;
  EXPECT_NE(message(o, huge).find("overflow"), std::string::npos);
  // A logit that overflows to -inf must not pass for a masked key (power kernel: it is the
  // largest weight).
  Inputs neg;
  neg.Q = Mat(1, 1);
  neg.K = Mat(2, 1);
  neg.V = oracle::gaussian(2, 2, 7);
  neg.Q(0, 0) = 1e20f;
  neg.K(0, 0) = -1e20f;
  neg.K(1, 0) = 1.0f;
  o = {};
  o.kernel = Kernel::power;
  EXPECT_NE(message(o, neg).find("overflow"), std::string::npos);
  o.kernel = Kernel::softmax;
  o.scale = 1.0;
  EXPECT_NE(message(o, neg).find("overflow"), std::string::npos);
}

TEST(Attention, AdaptiveBudgetIsCeilAlphaNToTheC) {
  EXPECT_EQ(adaptive_budget(16384, 2.0, 0.5), 256);
  EXPECT_EQ(adaptive_budget(1000, 1.5, 0.5), 48);   // ceil(47.43)
  EXPECT_EQ(adaptive_budget(10, 100.0, 1.0), 10);   // at most n
  EXPECT_EQ(adaptive_budget(10, 1e-9, 0.5), 1);     // at least 1
  EXPECT_THROW(adaptive_budget(10, 0.0, 0.5), Error);
  EXPECT_THROW(adaptive_budget(10, 1.0, 1.5), Error);
  EXPECT_THROW(adaptive_budget(10, 1.0, 0.0), Error);
  const Inputs in = random_inputs(30, 400, 6, 4, 111);
  AttentionOptions o;
  o.select = Select::topk;
  o.budget_alpha = 1.0;
  o.budget_exponent = 0.5;  // k = 20
  o.return_selection = true;
  AttentionResult r;
  const auto a = run(in, o, &r);
  EXPECT_EQ(r.selection.query_keys.size(), 30u * 20u);
  AttentionOptions fixed;
  fixed.select = Select::topk;
  fixed.top_k = 20;
  EXPECT_EQ(a, run(in, fixed));
  o.top_k = 20;  // both given
  EXPECT_THROW(run(in, o), Error);
  o.top_k = 0;
  o.select = Select::full;
  EXPECT_THROW(run(in, o), Error);
}

namespace {

// Each query's keys strongest first by brute force, ties to the lower key, over the keys it may
// attend (causal: j <= i; open keys only). Logits of small integers (scaled by 1/4 at d = 16)
// are exact in float32, so the order is the library's.
std::vector<std::vector<index_t>> brute_force_ranking(const Mat& Q, const Mat& K, Kernel kernel, bool causal,
                                                      const std::vector<std::uint8_t>& open) {
  const index_t m = Q.rows, n = K.rows, d = Q.cols;
  const double scale = kernel == Kernel::softmax ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0;
  std::vector<std::vector<index_t>> ranking(static_cast<std::size_t>(m));
  std::vector<std::pair<double, index_t>> row;
  for (index_t i = 0; i < m; ++i) {
    row.clear();
    for (index_t j = 0; j < n && (!causal || j <= i); ++j) {
      if (!open.empty() && !open[j]) continue;
      double s = 0.0;
      for (index_t x = 0; x < d; ++x) s += static_cast<double>(Q(i, x)) * K(j, x);
      s *= scale;
      row.emplace_back(kernel == Kernel::softmax ? -s : -std::fabs(s), j);  // ascending: strongest first
    }
    std::sort(row.begin(), row.end());
    for (const auto& e : row) ranking[i].push_back(e.second);
  }
  return ranking;
}

Mat small_integers(index_t rows, index_t cols, int levels, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  Mat x(rows, cols);
  for (float& e : x.v) e = static_cast<float>(static_cast<int>(g() % static_cast<std::uint64_t>(2 * levels + 1)) - levels);
  return x;
}

}  // namespace

// The exact top-k against brute force: every key order the streaming threshold meets (random,
// each key stronger than the last for every query, each weaker), runs of ties at the k-th place,
// k from 1 to n, more keys than two tiles, causal rows and masked keys.
TEST(Attention, ExactTopKIsTheBruteForceTopK) {
  const index_t d = 16, n = 1100;
  struct Keys {
    std::string name;
    Mat K;
  };
  std::vector<Keys> cases{{"random, few levels (ties)", small_integers(n, d, 1, 5)},
                          {"random, many levels", small_integers(n, d, 8, 6)}};
  // Every query has non-negative entries; keys c (1, ..., 1) with c rising (falling) in j give
  // every query logits that rise (fall) along the keys: in the first, each key beats the
  // threshold of the keys before it.
  Mat rising(n, d), falling(n, d);
  for (index_t j = 0; j < n; ++j)
    for (index_t x = 0; x < d; ++x) {
      rising(j, x) = static_cast<float>(j / 4);  // runs of 4 equal keys
      falling(j, x) = static_cast<float>((n - j) / 4);
    }
  cases.push_back({"rising", rising});
  cases.push_back({"falling", falling});
  Mat Q = small_integers(n, d, 2, 7);
  for (float& e : Q.v) e = std::fabs(e);
  std::vector<std::uint8_t> open(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) open[j] = (j % 7 != 3) && !(j >= 600 && j < 1000);
  for (const Keys& c : cases)
    for (Kernel kernel : {Kernel::softmax, Kernel::power})
      for (bool causal : {false, true})
        for (bool masked : {false, true}) {
          const auto ranking = brute_force_ranking(Q, c.K, kernel, causal, masked ? open : std::vector<std::uint8_t>());
          for (index_t k : {index_t{1}, index_t{7}, index_t{64}, index_t{300}, n - 1, n}) {
            AttentionOptions o;
            o.select = Select::topk, o.kernel = kernel, o.top_k = k, o.causal = causal;
            if (masked) o.key_mask = open.data();
            const Selection s = select_keys({Q.v.data(), 1, 1, n, d}, {c.K.v.data(), 1, 1, n, d}, o);
            ASSERT_EQ(s.top_k, k);
            std::vector<index_t> expected(static_cast<std::size_t>(n * k), -1);  // ascending, then -1
            for (index_t i = 0; i < n; ++i) {
              const index_t kept = std::min(k, static_cast<index_t>(ranking[i].size()));
              std::partial_sort_copy(ranking[i].begin(), ranking[i].begin() + kept, expected.begin() + i * k,
                                     expected.begin() + i * k + kept);
            }
            EXPECT_EQ(s.query_keys, expected) << c.name << ", kernel " << static_cast<int>(kernel) << ", k " << k
                                              << ", causal " << causal << ", masked " << masked;
          }
        }
}

// Precision::bfloat16: where it takes effect (bf16_products()), the output differs from float32's
// and stays within 2e-2 of float64 attention over the same selection (bfloat16 keeps 8
// significant bits: about 4e-3 relative error measured, docs/benchmarks.md); elsewhere it is
// float32's, bit for bit. Dense and a shared set, tiles of 512 keys and a remainder wider than
// 64 (the products' path) and narrower (float32's), the power kernel too.
TEST(Attention, Bf16ProductsStayNearFloat64AndFallBackToFloat32Elsewhere) {
  for (index_t n : {700, 560}) {
    const Inputs in = random_inputs(300, n, 64, 40, static_cast<std::uint64_t>(n));
    for (const char* spec : {"full", "leverage:128", "full+kernel:poly+p:2"}) {
      AttentionOptions o = parse_selection(spec);
      o.return_selection = true;
      AttentionResult r;
      const std::vector<float> f32 = run(in, o, &r);
      o.precision = Precision::bfloat16;
      const std::vector<float> b16 = run(in, o);
      const std::set<index_t> shared = r.selection.shared_keys.empty()
                                           ? std::set<index_t>()
                                           : std::set<index_t>(r.selection.shared_keys[0].begin(), r.selection.shared_keys[0].end());
      const auto mask = [&](index_t, index_t j) { return o.select == Select::full || shared.count(j) > 0; };
      const auto ref = oracle::attention(in.Q, in.K, in.V, o.kernel == Kernel::softmax, default_scale(o, 64), o.p, mask);
      if (bf16_products()) {
        EXPECT_NE(b16, f32) << spec << " n " << n;
        EXPECT_LT(oracle::rel_error(b16, ref), 2e-2) << spec << " n " << n;
        EXPECT_GT(oracle::rel_error(b16, ref), 10 * oracle::rel_error(f32, ref)) << spec << " n " << n;
      } else {
        EXPECT_EQ(b16, f32) << spec << " n " << n;
      }
    }
  }
}

TEST(Attention, PrecisionIsASpecField) {
  EXPECT_EQ(parse_selection("full+precision:bf16").precision, Precision::bfloat16);
  EXPECT_EQ(parse_selection("topk:8+precision:float32").precision, Precision::float32);
  EXPECT_EQ(selection_spec(parse_selection("leverage:32+precision:bf16")), "leverage:32+precision:bf16");
  try {
    parse_selection("full+precision:fp8");
    FAIL() << "precision:fp8 accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("precision"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bf16"), std::string::npos) << e.what();
  }
}
