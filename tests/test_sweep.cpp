// test_sweep.cpp: one differential sweep over every operation, in the style of ggml's
// test-backend-ops: operation x shape (d in 16, 64, 128; n below and far above d) x conditioning
// (1, 1e2, 1e4, rank-deficient) x thread count, each against the float64 oracle with the error
// budget stated below; and attention through the one engine: every selection x both kernels x
// causal x grouped-query shapes x forward and backward x thread count.
//
//   operation                      oracle                               budget
//   leverage_scores                SVD of K (float64)                   |tau~ - tau| <= g tau + 1e-9, g = rel_error_bound
//   universal_set(eps)             {tau_j >= eps (1 + 1e-6)}            contained (a superset)
//   streaming universal set        the offline universal_set            the same keys and scores, bit for bit
//   heavy_entries (x^2)            brute force over all keys (float64)  same entries, values within 1e-7 relative
//   attention full (softmax)       dense float64 softmax                max error 2e-5 of max |O|
//   attention leverage top-k       dense float64 masked to the set      max error 2e-5 of max |O|
//   lewis_weights (p = 3)          its fixed-point equation             residual <= 1e-6, sum = rank
//   every operation above          itself at 1, 2, 4 threads            bit for bit
//
//   engine, per selection spec x kernel x causal x shape:
//   attention() and select_keys    each other                           the same selection
//   float32 forward (attention()   dense float64 over the selection     max error 2e-5 of max |O|
//     and the differentiable one)
//   float64 forward and backward   dense float64 autograd-style         1e-11 of the largest entry
//   float64 backward               central differences of the loss      1e-6 relative, 3 random directions
//   float32 backward               dense float64 gradients              2e-5 of the largest entry
//   selection, forward, backward   themselves at 1, 2, 4 threads        bit for bit
#include <gtest/gtest.h>
#include <omp.h>

#include <random>
#include <set>
#include <sstream>

#include "cases.hpp"

using namespace levattn;
using oracle::Mat;

namespace {

// n x d with rank r: U diag(s) W^T, U (n x r) and W (d x r) orthonormal, s log-spaced from 1 to
// 1 / cond.
Mat conditioned_keys(index_t n, index_t d, index_t r, double cond, std::uint64_t seed) {
  const std::vector<double> U = cases::orthonormal_columns(n, r, seed), W = cases::orthonormal_columns(d, r, seed + 1);
  Mat K(n, d);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) {
      double s = 0;
      for (index_t c = 0; c < r; ++c)
        s += U[i * r + c] * std::pow(cond, -static_cast<double>(c) / static_cast<double>(std::max<index_t>(r - 1, 1))) *
             W[j * r + c];
      K(i, j) = static_cast<float>(s * std::sqrt(static_cast<double>(n)));
    }
  return K;
}

struct Case {
  std::string name;
  Mat K;
};

std::vector<Case> sweep_cases() {
  std::vector<Case> out;
  std::uint64_t seed = 100;
  for (index_t d : {16, 64, 128})
    for (index_t n : {d / 2, 32 * d})
      for (double cond : {1.0, 1e2, 1e4, 0.0}) {  // 0: rank-deficient (rank d / 4, cond 10)
        const index_t full = std::min(n, d);
        const index_t r = cond == 0.0 ? std::max<index_t>(1, d / 4) : full;
        std::ostringstream name;
        name << "d" << d << "_n" << n << (cond == 0.0 ? "_rank" : "_cond") << (cond == 0.0 ? static_cast<double>(r) : cond);
        out.push_back({name.str(), conditioned_keys(n, d, std::min(r, full), cond == 0.0 ? 10.0 : cond, seed += 3)});
      }
  return out;
}

template <class F>
void expect_same_at_every_thread_count(const std::string& what, F&& f) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const auto first = f();
  for (int t : {2, 4}) {
    omp_set_num_threads(t);
    EXPECT_TRUE(f() == first) << what << ": differs at " << t << " threads";
  }
  omp_set_num_threads(saved);
}

}  // namespace

TEST(Sweep, LeverageScoresUniversalSetsAndThreads) {
  for (const Case& c : sweep_cases()) {
    index_t rank = 0;
    const std::vector<double> tau = oracle::leverage_svd(c.K, 1e-5, 0.0, &rank);
    const LeverageScores s = leverage_scores(c.K.view());
    EXPECT_EQ(s.rank, rank) << c.name;
    double worst = 0;
    for (index_t j = 0; j < c.K.rows; ++j)
      worst = std::max(worst, (std::fabs(s.scores[j] - tau[j]) - 1e-9) / std::max(tau[j], 1e-300));
    EXPECT_LE(worst, s.rel_error_bound) << c.name;
    const UniversalSet u = universal_set(s, 0.05);
    const std::set<index_t> got(u.indices.begin(), u.indices.end());
    for (index_t j = 0; j < c.K.rows; ++j)
      if (tau[j] >= 0.05 * (1 + 1e-6)) {
        EXPECT_TRUE(got.count(j)) << c.name << " key " << j;
      }
    EXPECT_LE(static_cast<double>(u.indices.size()), u.size_bound) << c.name;
    expect_same_at_every_thread_count(c.name + " leverage", [&] { return leverage_scores(c.K.view()).scores; });
  }
}

TEST(Sweep, HeavyEntriesAgainstBruteForce) {
  for (const Case& c : sweep_cases()) {
    // 48 random queries and the worst-case queries of the first 64 keys (brute force is O(m n d)).
    const Mat all = cases::stress_queries(c.K, 48, 7);
    Mat Q(std::min<index_t>(all.rows, 48 + 64), c.K.cols);
    std::copy_n(all.v.begin(), Q.v.size(), Q.v.begin());
    const double eps = 0.05;
    const auto ref = oracle::heavy_x2(Q, c.K, eps);
    const HeavyEntries got = heavy_entries(Q.view(), c.K.view(), eps);
    std::map<std::pair<index_t, index_t>, double> have;
    for (const HeavyEntry& e : got.entries) have[{e.query, e.key}] = e.value;
    index_t missing = 0;
    double worst = 0;
    for (const auto& e : ref) {
      const auto it = have.find({e.i, e.j});
      if (it == have.end()) {
        missing += e.a >= eps * (1 + 1e-6) ? 1 : 0;
        continue;
      }
      worst = std::max(worst, std::fabs(it->second - e.a) / e.a);
    }
    EXPECT_EQ(missing, 0) << c.name;
    EXPECT_LE(worst, 1e-7) << c.name;
    for (const HeavyEntry& e : got.entries) EXPECT_GE(e.value, eps) << c.name;
    expect_same_at_every_thread_count(c.name + " heavy", [&] {
      std::vector<double> v;
      for (const HeavyEntry& e : heavy_entries(Q.view(), c.K.view(), eps).entries) v.push_back(e.value);
      return v;
    });
  }
}

TEST(Sweep, AttentionFullAndLeverageAgainstDenseFloat64) {
  for (const Case& c : sweep_cases()) {
    const index_t n = c.K.rows, d = c.K.cols;
    // Unit-scale keys for attention: the generator's keys grow with sqrt(n).
    Mat K = c.K;
    for (float& x : K.v) x = static_cast<float>(x / std::sqrt(static_cast<double>(n)) * 4.0);
    const Mat Q = oracle::gaussian(64, d, 3), V = oracle::gaussian(n, 16, 4);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    AttentionOptions full;
    const std::vector<float> got = attention(Q.view(), K.view(), V.view(), full);
    EXPECT_LT(oracle::rel_error(got, oracle::attention(Q, K, V, true, scale, 2.0, [](index_t, index_t) { return true; })),
              2e-5) << c.name;
    AttentionOptions lev;
    lev.select = Select::leverage;
    lev.top_k = std::max<index_t>(1, n / 4);
    lev.return_selection = true;
    AttentionResult r;
    const std::vector<float> sel = attention(Q.view(), K.view(), V.view(), lev, &r);
    std::vector<char> in(static_cast<std::size_t>(n), 0);
    for (index_t j : r.selection.shared_keys.at(0)) in[j] = 1;
    EXPECT_LT(oracle::rel_error(sel, oracle::attention(Q, K, V, true, scale, 2.0,
                                                           [&](index_t, index_t j) { return in[j] != 0; })),
              2e-5) << c.name;
    expect_same_at_every_thread_count(c.name + " attention", [&] {
      return attention(Q.view(), K.view(), V.view(), lev);
    });
  }
}

TEST(Sweep, LewisWeightsFixedPoint) {
  for (const Case& c : sweep_cases()) {
    if (c.K.cols > 64) continue;  // O(iterations n d^2): the small dimensions suffice here
    LewisOptions o;
    o.p = 3.0;
    const LewisWeights w = lewis_weights(c.K.view(), o);
    EXPECT_TRUE(w.converged) << c.name;
    EXPECT_LE(w.residual, 1e-6) << c.name;
    double sum = 0;
    for (double x : w.weights) sum += x;
    EXPECT_NEAR(sum, static_cast<double>(w.rank), 1e-6 * static_cast<double>(w.rank)) << c.name;
    expect_same_at_every_thread_count(c.name + " lewis", [&] { return lewis_weights(c.K.view(), o).weights; });
  }
}

TEST(Sweep, StreamingEqualsOffline) {
  for (const Case& c : sweep_cases()) {
    const UniversalSet want = universal_set(c.K.view(), 0.05);
    StreamingUniversalSet s(c.K.cols, 0, 0.05);
    for (index_t i = 0; i < c.K.rows; i += 37)
      s.push({c.K.v.data() + i * c.K.cols, std::min<index_t>(37, c.K.rows - i), c.K.cols}, {});
    const UniversalSet got = s.universal_set();
    EXPECT_EQ(got.indices, want.indices) << c.name;
    EXPECT_EQ(got.scores, want.scores) << c.name;
    EXPECT_EQ(got.rank, want.rank) << c.name;
  }
}

namespace {

using oracle::as;
using oracle::normal;
using oracle::rel_error;

// One engine case's inputs: Q (pairs, m, d), K and V (batch * kv, n, .), dout (pairs, m, dv).
struct EngineInputs {
  AttentionShape sh;
  std::vector<double> q, k, v, dout;
  index_t pairs() const { return sh.batch * sh.heads; }
  Tensor4Ref Q(const std::vector<float>& x) const { return {x.data(), sh.batch, sh.heads, sh.m, sh.d}; }
  Tensor4Ref KV(const std::vector<float>& x, index_t cols) const { return {x.data(), sh.batch, sh.kv(), sh.n, cols}; }
};

EngineInputs engine_inputs(const AttentionShape& sh, std::uint64_t seed) {
  const index_t pairs = sh.batch * sh.heads, kv = sh.batch * sh.kv();
  return {sh, normal(pairs * sh.m * sh.d, seed), normal(kv * sh.n * sh.d, seed + 1), normal(kv * sh.n * sh.dv, seed + 2),
          normal(pairs * sh.m * sh.dv, seed + 3)};
}

struct Gradients {
  std::vector<float> out, stat, dq, dk, dv;
  bool operator==(const Gradients&) const = default;
};

template <class T>
Gradients forward_backward(const EngineInputs& in, const Selection& sel, const KernelOptions& kernel) {
  const auto q = as<T>(in.q), k = as<T>(in.k), v = as<T>(in.v), dout = as<T>(in.dout);
  std::vector<T> out(in.pairs() * in.sh.m * in.sh.dv), stat(in.pairs() * in.sh.m), dq(q.size()), dk(k.size()),
      dv(v.size());
  selected_attention_forward<T>(in.sh, sel, kernel, q.data(), k.data(), v.data(), out.data(), stat.data());
  selected_attention_backward<T>(in.sh, sel, kernel, q.data(), k.data(), v.data(), out.data(), stat.data(), dout.data(),
                                 dq.data(), dk.data(), dv.data());
  return {as<float>(out), as<float>(stat), as<float>(dq), as<float>(dk), as<float>(dv)};
}

// The float64 loss sum(dout * out) at q + t u_q, k + t u_k, v + t u_v.
double loss_along(const EngineInputs& in, const Selection& sel, const KernelOptions& kernel,
                  const std::vector<double> (&u)[3], double t) {
  std::vector<double> x[3] = {in.q, in.k, in.v};
  for (int a = 0; a < 3; ++a)
    for (std::size_t i = 0; i < x[a].size(); ++i) x[a][i] += t * u[a][i];
  std::vector<double> out(in.pairs() * in.sh.m * in.sh.dv), stat(in.pairs() * in.sh.m);
  selected_attention_forward<double>(in.sh, sel, kernel, x[0].data(), x[1].data(), x[2].data(), out.data(), stat.data());
  double l = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * in.dout[i];
  return l;
}

// One spec on one shape: every row of the engine table in the header.
void sweep_engine_case(const EngineInputs& in, const std::string& spec, bool causal) {
  SCOPED_TRACE(spec + (causal ? " causal" : "") + " on (" + std::to_string(in.sh.batch) + ", " +
               std::to_string(in.sh.heads) + "/" + std::to_string(in.sh.kv()) + ", " + std::to_string(in.sh.m) + ", " +
               std::to_string(in.sh.n) + ")");
  AttentionOptions o = parse_selection(spec);
  o.causal = causal;
  const auto qf = as<float>(in.q), kf = as<float>(in.k), vf = as<float>(in.v);
  const Selection sel = select_keys(in.Q(qf), in.KV(kf, in.sh.d), o);
  const bool softmax = o.kernel == Kernel::softmax;
  const double scale = logit_scale(o, in.sh.d);
  const oracle::MaskedAttention ref = oracle::masked_attention(in.sh, sel, softmax, o.p, scale, as<double>(qf),
                                                               as<double>(kf), as<double>(vf), in.dout);
  // attention(): the same selection, its output within the float32 budget.
  o.return_selection = true;
  std::vector<float> out(ref.out.size());
  const AttentionResult r = attention(in.Q(qf), in.KV(kf, in.sh.d), in.KV(vf, in.sh.dv), out.data(), o);
  EXPECT_TRUE(r.selection == sel);
  EXPECT_LT(rel_error(out, ref.out), 2e-5) << "attention()";
  o.return_selection = false;
  // The differentiable pair in float32 and float64 against the dense computation.
  const Gradients g32 = forward_backward<float>(in, sel, o);
  EXPECT_LT(rel_error(g32.out, ref.out), 2e-5) << "float32 forward";
  EXPECT_LT(rel_error(g32.dq, ref.dq), 2e-5) << "float32 dq";
  EXPECT_LT(rel_error(g32.dk, ref.dk), 2e-5) << "float32 dk";
  EXPECT_LT(rel_error(g32.dv, ref.dv), 2e-5) << "float32 dv";
  const oracle::MaskedAttention exact = oracle::masked_attention(in.sh, sel, softmax, o.p, scale, in.q, in.k, in.v, in.dout);
  std::vector<double> dq(in.q.size()), dk(in.k.size()), dv(in.v.size()), out64(exact.out.size()), stat(in.pairs() * in.sh.m);
  selected_attention_forward<double>(in.sh, sel, o, in.q.data(), in.k.data(), in.v.data(), out64.data(), stat.data());
  selected_attention_backward<double>(in.sh, sel, o, in.q.data(), in.k.data(), in.v.data(), out64.data(), stat.data(),
                                      in.dout.data(), dq.data(), dk.data(), dv.data());
  EXPECT_LT(rel_error(out64, exact.out), 1e-11) << "float64 forward";
  EXPECT_LT(rel_error(dq, exact.dq), 1e-11) << "float64 dq";
  EXPECT_LT(rel_error(dk, exact.dk), 1e-11) << "float64 dk";
  EXPECT_LT(rel_error(dv, exact.dv), 1e-11) << "float64 dv";
  // Central differences along random directions: the gradient's formula, not only its code.
  for (std::uint64_t dir = 0; dir < 3; ++dir) {
    const std::vector<double> u[3] = {normal(dq.size(), 90 + dir), normal(dk.size(), 93 + dir), normal(dv.size(), 96 + dir)};
    double predicted = 0.0;
    for (std::size_t i = 0; i < dq.size(); ++i) predicted += dq[i] * u[0][i];
    for (std::size_t i = 0; i < dk.size(); ++i) predicted += dk[i] * u[1][i];
    for (std::size_t i = 0; i < dv.size(); ++i) predicted += dv[i] * u[2][i];
    const double h = 1e-6;
    const double measured = (loss_along(in, sel, o, u, h) - loss_along(in, sel, o, u, -h)) / (2 * h);
    EXPECT_NEAR(measured, predicted, 1e-6 * std::max(1.0, std::fabs(predicted))) << "direction " << dir;
  }
  // The same bits at every thread count: the selection, attention() and the differentiable pair.
  expect_same_at_every_thread_count(spec + " select_keys", [&] { return select_keys(in.Q(qf), in.KV(kf, in.sh.d), o); });
  expect_same_at_every_thread_count(spec + " attention", [&] {
    std::vector<float> again(out.size());
    attention(in.Q(qf), in.KV(kf, in.sh.d), in.KV(vf, in.sh.dv), again.data(), o);
    return again;
  });
  expect_same_at_every_thread_count(spec + " forward, backward", [&] { return forward_backward<float>(in, sel, o); });
}

}  // namespace

TEST(Sweep, EverySelectionKernelAndCausalModeThroughTheEngine) {
  // Grouped-query shapes (2 query heads per kv head) crossing no tile boundary and one that
  // does (m = n = 300 > the 256-row tile); m != n where causal attention does not apply.
  const std::vector<std::string> selections = {
      "full", "leverage:12", "leverage+eps:0.08", "topk:7", "random:10", "window:4", "window:3+sinks:2",
      "leverage:8+window:2+sinks:1", "random:6+sinks:2", "cluster:6", "cluster:5+window:2+sinks:1"};
  const std::vector<std::string> kernels = {"", "+kernel:poly", "+kernel:poly+p:3"};
  struct Shape {
    AttentionShape sh;
    bool causal;
  };
  const Shape shapes[] = {{{1, 4, 45, 70, 8, 5, 2}, false}, {{2, 2, 70, 70, 8, 5, 1}, true}, {{1, 2, 300, 300, 16, 8, 1}, true}};
  std::uint64_t seed = 700;
  for (const Shape& s : shapes) {
    const EngineInputs in = engine_inputs(s.sh, seed += 10);
    for (bool causal : {false, true}) {
      if (causal && !s.causal) continue;
      for (const std::string& select : selections)
        for (const std::string& kernel : kernels) {
          const bool leverage = select.rfind("leverage", 0) == 0;
          // Causal leverage keeps eps-heavy x^2 entries: it takes eps and p = 2 (math.md 1.6).
          if (causal && leverage && (select.find("eps") == std::string::npos || kernel.find("p:3") != std::string::npos))
            continue;
          sweep_engine_case(in, select + kernel, causal);
        }
    }
  }
}
