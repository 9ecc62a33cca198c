// test_sweep.cpp: one differential sweep over every operation, in the style of ggml's
// test-backend-ops: operation x shape (d in 16, 64, 128; n below and far above d) x conditioning
// (1, 1e2, 1e4, rank-deficient) x thread count, each against the float64 oracle with the error
// budget stated below.
//
//   operation                      oracle                               budget
//   leverage_scores                SVD of K (float64)                   |tau~ - tau| <= g tau + 1e-9, g = rel_error_bound
//   universal_set(eps)             {tau_j >= eps (1 + 1e-6)}            contained (a superset)
//   heavy_entries (x^2)            brute force over all keys (float64)  same entries, values within 1e-7 relative
//   attention full (softmax)       dense float64 softmax                max error 2e-5 of max |O|
//   attention leverage top-k       dense float64 masked to the set      max error 2e-5 of max |O|
//   lewis_weights (p = 3)          its fixed-point equation             residual <= 1e-6, sum = rank
//   every operation above          itself at 1, 2, 4 threads            bit for bit
#include <gtest/gtest.h>
#include <omp.h>

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
    EXPECT_LT(oracle::max_rel_error(got, oracle::attention(Q, K, V, true, scale, 2.0, [](index_t, index_t) { return true; })),
              2e-5) << c.name;
    AttentionOptions lev;
    lev.select = Select::leverage;
    lev.top_k = std::max<index_t>(1, n / 4);
    lev.return_selection = true;
    AttentionResult r;
    const std::vector<float> sel = attention(Q.view(), K.view(), V.view(), lev, &r);
    std::vector<char> in(static_cast<std::size_t>(n), 0);
    for (index_t j : r.selection.shared_keys.at(0)) in[j] = 1;
    EXPECT_LT(oracle::max_rel_error(sel, oracle::attention(Q, K, V, true, scale, 2.0,
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
