// Attention over a fixed selection and its gradients, against a dense masked computation in
// float64 (the n x n mask and weights written out) and against finite differences.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::AttentionOptions;
using levattn::AttentionShape;
using levattn::index_t;
using levattn::Kernel;
using levattn::Select;
using levattn::Selection;

using oracle::as;
using oracle::normal;
using oracle::rel_error;

struct Case {
  const char* name;
  AttentionOptions o;
};

std::vector<Case> cases(bool causal = false) {
  std::vector<Case> c;
  const auto add = [&](const char* name, Select s, Kernel kern, double p, index_t top_k, index_t window, index_t sinks) {
    AttentionOptions o;
    o.select = s, o.kernel = kern, o.p = p, o.top_k = top_k, o.window = window, o.sinks = sinks, o.seed = 5;
    o.causal = causal;
    if (causal && s == Select::leverage) o.top_k = 0, o.eps = 0.05, o.p = 2;  // causal leverage takes eps
    c.push_back({name, o});
  };
  add("full softmax", Select::full, Kernel::softmax, 2, 0, -1, 0);
  add("full power p=3", Select::full, Kernel::power, 3, 0, -1, 0);
  add("leverage + window + sinks", Select::leverage, Kernel::softmax, 2, 40, 9, 3);
  add("leverage power p=2", Select::leverage, Kernel::power, 2, 24, -1, 0);
  add("random + window", Select::random, Kernel::softmax, 2, 30, 4, 0);
  add("window + sinks power p=1.5", Select::window, Kernel::power, 1.5, 0, 6, 2);
  add("topk softmax", Select::topk, Kernel::softmax, 2, 17, -1, 0);
  add("topk power p=4", Select::topk, Kernel::power, 4, 9, -1, 0);
  return c;
}

// Shapes that cross the query-tile (128) and key-block (256) boundaries, with m != n.
constexpr AttentionShape kShape{2, 2, 300, 530, 12, 7};

// Causal attention needs m == n; 530 queries make three causal blocks, the last one partial.
constexpr AttentionShape kCausalShape{2, 2, 530, 530, 12, 7};

template <class T>
void check_against_dense(double tol, bool causal = false) {
  const AttentionShape sh = causal ? kCausalShape : kShape;
  const index_t pairs = sh.batch * sh.heads;
  const auto q = normal(pairs * sh.m * sh.d, 1), k = normal(pairs * sh.n * sh.d, 2), v = normal(pairs * sh.n * sh.dv, 3),
             dout = normal(pairs * sh.m * sh.dv, 4);
  const auto qf = as<float>(q), kf = as<float>(k);
  const auto qt = as<T>(q), kt = as<T>(k), vt = as<T>(v), dt = as<T>(dout);
  for (const Case& c : cases(causal)) {
    SCOPED_TRACE(c.name);
    const levattn::Tensor4Ref Q{qf.data(), sh.batch, sh.heads, sh.m, sh.d}, K{kf.data(), sh.batch, sh.heads, sh.n, sh.d};
    const Selection sel = levattn::select_keys(Q, K, c.o);
    const bool softmax = c.o.kernel == Kernel::softmax;
    const double scale = softmax ? 1.0 / std::sqrt(static_cast<double>(sh.d)) : 1.0;
    const oracle::MaskedAttention ref =
        oracle::masked_attention(sh, sel, softmax, c.o.p, scale, as<double>(qt), as<double>(kt), as<double>(vt), as<double>(dt));
    std::vector<T> out(ref.out.size()), stat(pairs * sh.m), dq(ref.dq.size()), dk(ref.dk.size()), dv(ref.dv.size());
    levattn::selected_attention_forward<T>(sh, sel, c.o, qt.data(), kt.data(), vt.data(), out.data(), stat.data());
    EXPECT_LT(rel_error(out, ref.out), tol);
    levattn::selected_attention_backward<T>(sh, sel, c.o, qt.data(), kt.data(), vt.data(), out.data(), stat.data(),
                                            dt.data(), dq.data(), dk.data(), dv.data());
    EXPECT_LT(rel_error(dq, ref.dq), tol) << "dq";
    EXPECT_LT(rel_error(dk, ref.dk), tol) << "dk";
    EXPECT_LT(rel_error(dv, ref.dv), tol) << "dv";
  }
}

// All three parts at once: shared keys, a window band and own keys (with unused slots), built by
// hand so that the kernels are tested apart from any selection.
Selection mixed_selection(const AttentionShape& sh, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  Selection s;
  s.batch = sh.batch, s.heads = sh.heads, s.m = sh.m, s.n = sh.n, s.window = 3, s.top_k = 9;
  const index_t pairs = sh.batch * sh.heads;
  s.query_keys.assign(static_cast<std::size_t>(pairs * sh.m * s.top_k), -1);
  for (index_t h = 0; h < pairs; ++h) {
    std::vector<index_t> shared;
    for (index_t j = 0; j < sh.n; ++j)
      if (g() % 23 == 0) shared.push_back(j);
    s.shared_keys.push_back(shared);
    for (index_t i = 0; i < sh.m; ++i) {
      std::vector<index_t> own;
      while (static_cast<index_t>(own.size()) < 1 + static_cast<index_t>(i % s.top_k)) {
        const auto j = static_cast<index_t>(g() % static_cast<std::uint64_t>(sh.n));
        if (std::llabs(i - j) > s.window && !std::binary_search(shared.begin(), shared.end(), j) &&
            std::find(own.begin(), own.end(), j) == own.end())
          own.push_back(j);
      }
      std::copy(own.begin(), own.end(), s.query_keys.begin() + (h * sh.m + i) * s.top_k);
    }
  }
  return s;
}

// Forward and backward in float64 over `sel` equal the dense masked computation (softmax, and
// the power kernel with exponent p), d = 12.
void expect_dense_gradients(const AttentionShape& sh, const Selection& sel, double p, const std::vector<double>& q,
                            const std::vector<double>& k, const std::vector<double>& v, const std::vector<double>& dout) {
  for (const Kernel kern : {Kernel::softmax, Kernel::power}) {
    AttentionOptions o;
    o.kernel = kern, o.p = p;
    const bool softmax = kern == Kernel::softmax;
    const double scale = softmax ? 1.0 / std::sqrt(12.0) : 1.0;
    const oracle::MaskedAttention ref = oracle::masked_attention(sh, sel, softmax, o.p, scale, q, k, v, dout);
    std::vector<double> out(ref.out.size()), stat(sel.pairs() * sh.m), dq(q.size()), dk(k.size()), dv(v.size());
    levattn::selected_attention_forward<double>(sh, sel, o, q.data(), k.data(), v.data(), out.data(), stat.data());
    levattn::selected_attention_backward<double>(sh, sel, o, q.data(), k.data(), v.data(), out.data(), stat.data(),
                                                 dout.data(), dq.data(), dk.data(), dv.data());
    EXPECT_LT(rel_error(out, ref.out), 1e-11);
    EXPECT_LT(rel_error(dq, ref.dq), 1e-11);
    EXPECT_LT(rel_error(dk, ref.dk), 1e-11);
    EXPECT_LT(rel_error(dv, ref.dv), 1e-11);
  }
}

TEST(SelectedAttention, SharedWindowAndOwnKeysTogether) {
  const AttentionShape sh = kShape;
  const index_t pairs = sh.batch * sh.heads;
  const auto q = normal(pairs * sh.m * sh.d, 51), k = normal(pairs * sh.n * sh.d, 52), v = normal(pairs * sh.n * sh.dv, 53),
             dout = normal(pairs * sh.m * sh.dv, 54);
  const Selection sel = mixed_selection(sh, 55);
  expect_dense_gradients(sh, sel, 2.5, q, k, v, dout);
  Selection bad = sel;
  bad.query_keys[0] = 1;  // query 0's window holds key 1
  const std::vector<double> out(pairs * sh.m * sh.dv), stat(pairs * sh.m);
  EXPECT_NE(oracle::error_of([&] {
              std::vector<double> o2(out), s2(stat);
              levattn::selected_attention_forward<double>(sh, bad, {}, q.data(), k.data(), v.data(), o2.data(), s2.data());
            }).second.find("window"),
            std::string::npos);
}

TEST(SelectedAttention, Float64MatchesDenseMaskedComputation) { check_against_dense<double>(1e-11); }
TEST(SelectedAttention, Float32MatchesDenseMaskedComputation) { check_against_dense<float>(2e-5); }
TEST(SelectedAttention, CausalFloat64MatchesDenseMaskedComputation) { check_against_dense<double>(1e-11, true); }
TEST(SelectedAttention, CausalFloat32MatchesDenseMaskedComputation) { check_against_dense<float>(2e-5, true); }

// A causal selection with a shared set per segment of 100 queries (not a multiple of the query
// tile), a window and own keys, built by hand: every part cut at the query, the band masked by
// each segment's own set.
TEST(SelectedAttention, CausalSegmentsWindowAndOwnKeys) {
  const AttentionShape sh = kCausalShape;
  const index_t pairs = sh.batch * sh.heads;
  std::mt19937_64 g(61);
  Selection s;
  s.batch = sh.batch, s.heads = sh.heads, s.m = sh.m, s.n = sh.n, s.window = 5, s.top_k = 4, s.causal = true;
  s.segment = 100;
  s.query_keys.assign(static_cast<std::size_t>(pairs * sh.m * s.top_k), -1);
  for (index_t h = 0; h < pairs; ++h) {
    for (index_t seg = 0; seg < s.segments(); ++seg) {
      std::vector<index_t> shared;
      for (index_t j = 0; j < sh.n; ++j)
        if (g() % 7 == 0) shared.push_back(j);  // keys after the segment too: causal cuts them
      s.shared_keys.push_back(shared);
    }
    for (index_t i = 0; i < sh.m; ++i) {
      const auto& shared = s.shared_keys[h * s.segments() + i / s.segment];
      std::vector<index_t> own;
      for (int tries = 0; tries < 40 && static_cast<index_t>(own.size()) < s.top_k; ++tries) {
        const auto j = static_cast<index_t>(g() % static_cast<std::uint64_t>(i + 1));
        if (i - j > s.window && !std::binary_search(shared.begin(), shared.end(), j) &&
            std::find(own.begin(), own.end(), j) == own.end())
          own.push_back(j);
      }
      std::copy(own.begin(), own.end(), s.query_keys.begin() + (h * sh.m + i) * s.top_k);
    }
  }
  const auto q = normal(pairs * sh.m * sh.d, 62), k = normal(pairs * sh.n * sh.d, 63), v = normal(pairs * sh.n * sh.dv, 64),
             dout = normal(pairs * sh.m * sh.dv, 65);
  expect_dense_gradients(sh, s, 3, q, k, v, dout);
  Selection bad = s;
  bad.query_keys[(3 * s.top_k)] = 10;  // query 3 cannot attend key 10
  std::vector<double> o2(pairs * sh.m * sh.dv), s2(pairs * sh.m);
  EXPECT_NE(oracle::error_of([&] {
              levattn::selected_attention_forward<double>(sh, bad, {}, q.data(), k.data(), v.data(), o2.data(), s2.data());
            }).second.find("follow"),
            std::string::npos);
  bad = s;
  bad.shared_keys.pop_back();
  EXPECT_NE(oracle::error_of([&] {
              levattn::selected_attention_forward<double>(sh, bad, {}, q.data(), k.data(), v.data(), o2.data(), s2.data());
            }).second.find("segment"),
            std::string::npos);
}

// The loss sum(dout * out) changes by <grad, e> to first order: central differences in float64.
// Causal cases with m == n (causal attention is self-attention).
void check_finite_differences(bool causal) {
  const AttentionShape sh{1, 2, causal ? 13 : 9, 13, 4, 3};
  const index_t pairs = 2;
  auto q = normal(pairs * sh.m * sh.d, 11), k = normal(pairs * sh.n * sh.d, 12), v = normal(pairs * sh.n * sh.dv, 13);
  const auto dout = normal(pairs * sh.m * sh.dv, 14);
  for (const Case& c : cases(causal)) {
    SCOPED_TRACE(c.name);
    const auto qf = as<float>(q), kf = as<float>(k);
    const Selection sel = levattn::select_keys({qf.data(), 1, 2, sh.m, sh.d}, {kf.data(), 1, 2, sh.n, sh.d}, c.o);
    const auto loss = [&] {
      std::vector<double> out(pairs * sh.m * sh.dv), stat(pairs * sh.m);
      levattn::selected_attention_forward<double>(sh, sel, c.o, q.data(), k.data(), v.data(), out.data(), stat.data());
      double l = 0.0;
      for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * dout[i];
      return l;
    };
    std::vector<double> out(pairs * sh.m * sh.dv), stat(pairs * sh.m), dq(q.size()), dk(k.size()), dv(v.size());
    levattn::selected_attention_forward<double>(sh, sel, c.o, q.data(), k.data(), v.data(), out.data(), stat.data());
    levattn::selected_attention_backward<double>(sh, sel, c.o, q.data(), k.data(), v.data(), out.data(), stat.data(),
                                                 dout.data(), dq.data(), dk.data(), dv.data());
    const std::pair<std::vector<double>*, std::vector<double>*> args[] = {{&q, &dq}, {&k, &dk}, {&v, &dv}};
    for (auto [x, g] : args)
      for (std::size_t i = 0; i < x->size(); i += 3) {
        const double h = 1e-6, x0 = (*x)[i];
        (*x)[i] = x0 + h;
        const double up = loss();
        (*x)[i] = x0 - h;
        const double down = loss();
        (*x)[i] = x0;
        EXPECT_NEAR((up - down) / (2 * h), (*g)[i], 1e-6 * std::max(1.0, std::fabs((*g)[i])));
      }
  }
}

TEST(SelectedAttention, GradientsMatchFiniteDifferences) { check_finite_differences(false); }
TEST(SelectedAttention, CausalGradientsMatchFiniteDifferences) { check_finite_differences(true); }

// select_keys makes attention()'s selection, and the float32 forward gives attention()'s output.
TEST(SelectedAttention, SelectKeysIsAttentionsSelection) {
  const AttentionShape sh{2, 3, 150, 150, 16, 16};
  const index_t pairs = 6;
  const auto q = as<float>(normal(pairs * sh.m * sh.d, 21)), k = as<float>(normal(pairs * sh.n * sh.d, 22)),
             v = as<float>(normal(pairs * sh.n * sh.dv, 23));
  const levattn::Tensor4Ref Q{q.data(), 2, 3, sh.m, sh.d}, K{k.data(), 2, 3, sh.n, sh.d}, V{v.data(), 2, 3, sh.n, sh.dv};
  for (Case c : cases()) {
    SCOPED_TRACE(c.name);
    c.o.return_selection = true;
    std::vector<float> ref(pairs * sh.m * sh.dv), out(ref.size()), stat(pairs * sh.m);
    const levattn::AttentionResult r = levattn::attention(Q, K, V, ref.data(), c.o);
    const Selection sel = levattn::select_keys(Q, K, c.o);
    EXPECT_TRUE(sel == r.selection);  // attention() attends exactly what select_keys selects
    levattn::selected_attention_forward<float>(sh, sel, c.o, q.data(), k.data(), v.data(), out.data(), stat.data());
    EXPECT_LT(rel_error(out, std::vector<double>(ref.begin(), ref.end())), 2e-5);
  }
}

TEST(SelectedAttention, GradientsDoNotDependOnThreadCount) {
  const AttentionShape sh = kShape;
  const index_t pairs = 4;
  const auto q = as<float>(normal(pairs * sh.m * sh.d, 31)), k = as<float>(normal(pairs * sh.n * sh.d, 32)),
             v = as<float>(normal(pairs * sh.n * sh.dv, 33)), dout = as<float>(normal(pairs * sh.m * sh.dv, 34));
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const auto runs = oracle::at_each_thread_count([&] {
      const Selection sel = levattn::select_keys({q.data(), 2, 2, sh.m, sh.d}, {k.data(), 2, 2, sh.n, sh.d}, c.o);
      std::vector<float> out(pairs * sh.m * sh.dv), stat(pairs * sh.m), g(q.size() + k.size() + v.size());
      levattn::selected_attention_forward<float>(sh, sel, c.o, q.data(), k.data(), v.data(), out.data(), stat.data());
      levattn::selected_attention_backward<float>(sh, sel, c.o, q.data(), k.data(), v.data(), out.data(), stat.data(),
                                                  dout.data(), g.data(), g.data() + q.size(),
                                                  g.data() + q.size() + k.size());
      g.insert(g.end(), out.begin(), out.end());
      return g;
    });
    for (const auto& r : runs) EXPECT_EQ(r, runs[0]);
  }
}

// A query that no key is selected for: output 0, statistic +inf, no gradient.
TEST(SelectedAttention, EmptyRowsAreZeroAndCarryNoGradient) {
  const AttentionShape sh{1, 1, 40, 10, 3, 2};
  Selection sel;
  sel.batch = sel.heads = 1, sel.m = 40, sel.n = 10, sel.window = 2;
  sel.shared_keys = {{}};
  AttentionOptions o;
  const auto q = normal(40 * 3, 41), k = normal(10 * 3, 42), v = normal(10 * 2, 43), dout = normal(40 * 2, 44);
  std::vector<double> out(80), stat(40), dq(120, 7.0), dk(30), dv(20);
  levattn::selected_attention_forward<double>(sh, sel, o, q.data(), k.data(), v.data(), out.data(), stat.data());
  levattn::selected_attention_backward<double>(sh, sel, o, q.data(), k.data(), v.data(), out.data(), stat.data(),
                                               dout.data(), dq.data(), dk.data(), dv.data());
  for (index_t i = 12; i < 40; ++i) {  // queries 12.. see no key within distance 2 of 0 .. 9
    EXPECT_EQ(stat[i], INFINITY);
    for (index_t x = 0; x < 2; ++x) EXPECT_EQ(out[i * 2 + x], 0.0);
    for (index_t x = 0; x < 3; ++x) EXPECT_EQ(dq[i * 3 + x], 0.0);
  }
  EXPECT_TRUE(std::isfinite(stat[11]));
}

TEST(SelectedAttention, RejectsInconsistentSelectionsAndInputs) {
  const AttentionShape sh{1, 1, 4, 6, 2, 2};
  const std::vector<double> q(8, 0.5), k(12, 0.25), v(12, 1.0);
  std::vector<double> out(8), stat(4);
  AttentionOptions o;
  const auto message = [&](const Selection& s, const std::vector<double>& qq) {
    return oracle::error_of([&] {
             levattn::selected_attention_forward<double>(sh, s, o, qq.data(), k.data(), v.data(), out.data(), stat.data());
           }).second;
  };
  Selection s;
  s.batch = s.heads = 1, s.m = 4, s.n = 6, s.shared_keys = {{0, 2}};
  EXPECT_EQ(message(s, q), "no error");
  Selection bad = s;
  bad.shared_keys = {{2, 0}};
  EXPECT_NE(message(bad, q).find("ascending"), std::string::npos);
  bad = s, bad.n = 7;
  EXPECT_NE(message(bad, q).find("used with"), std::string::npos);
  bad = s, bad.shared_keys.clear(), bad.top_k = 2, bad.query_keys = {0, 1, 1, 1, 0, 2, 3, 4};
  EXPECT_NE(message(bad, q).find("distinct"), std::string::npos);
  std::vector<double> nan_q = q;
  nan_q[3] = NAN;
  EXPECT_NE(message(s, nan_q).find("queries: expected finite"), std::string::npos);
  const std::vector<double> dout(8, NAN);
  std::vector<double> dq(8);
  levattn::selected_attention_forward<double>(sh, s, o, q.data(), k.data(), v.data(), out.data(), stat.data());
  const auto [kind, msg] = oracle::error_of([&] {
    levattn::selected_attention_backward<double>(sh, s, o, q.data(), k.data(), v.data(), out.data(), stat.data(),
                                                 dout.data(), dq.data(), nullptr, nullptr);
  });
  EXPECT_EQ(kind, levattn::ErrorKind::invalid_argument);
  EXPECT_NE(msg.find("output gradient"), std::string::npos);
}

}  // namespace

// The float32 engine against the float64 reference, output and row statistics, where its paths
// split: shared keys with a window band and own keys (mixed_selection), and own keys beyond a
// narrow tile (64: a BLAS product) and beyond a whole tile (512: taken in pieces).
TEST(AttentionEngine, Float32EqualsTheFloat64ReferenceOnEveryPath) {
  struct Run {
    const char* name;
    AttentionShape sh;
    index_t top_k;  // own keys per query (topk); 0: mixed_selection
  };
  for (const Run& run : {Run{"mixed", kShape, 0}, Run{"own keys 100", {1, 2, 40, 700, 12, 7}, 100},
                         Run{"own keys 600", {1, 2, 40, 700, 12, 7}, 600}}) {
    for (const Kernel kern : {Kernel::softmax, Kernel::power}) {
      SCOPED_TRACE(std::string(run.name) + (kern == Kernel::softmax ? " softmax" : " power"));
      const AttentionShape sh = run.sh;
      const index_t pairs = sh.batch * sh.heads;
      const auto q = normal(pairs * sh.m * sh.d, 61), k = normal(pairs * sh.n * sh.d, 62), v = normal(pairs * sh.n * sh.dv, 63);
      const auto qf = as<float>(q), kf = as<float>(k), vf = as<float>(v);
      AttentionOptions o;
      o.kernel = kern, o.p = 3.0;
      Selection sel = mixed_selection(sh, 64);
      if (run.top_k > 0) {
        o.select = Select::topk, o.top_k = run.top_k;
        sel = levattn::select_keys({qf.data(), sh.batch, sh.heads, sh.m, sh.d}, {kf.data(), sh.batch, sh.heads, sh.n, sh.d}, o);
      }
      const auto qd = as<double>(qf), kd = as<double>(kf), vd = as<double>(vf);  // the same numbers in both
      std::vector<float> out(pairs * sh.m * sh.dv), stat(pairs * sh.m);
      std::vector<double> ref(out.size()), ref_stat(stat.size());
      levattn::selected_attention_forward<float>(sh, sel, o, qf.data(), kf.data(), vf.data(), out.data(), stat.data());
      levattn::selected_attention_forward<double>(sh, sel, o, qd.data(), kd.data(), vd.data(), ref.data(), ref_stat.data());
      EXPECT_LT(rel_error(as<double>(out), ref), 2e-6);
      double worst = 0.0;
      for (std::size_t i = 0; i < stat.size(); ++i) worst = std::max(worst, std::fabs(stat[i] - ref_stat[i]) / std::max(1.0, std::fabs(ref_stat[i])));
      EXPECT_LT(worst, 2e-6);
    }
  }
}
