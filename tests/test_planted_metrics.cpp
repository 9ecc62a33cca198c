#include <gtest/gtest.h>

#include <set>

#include "cases.hpp"

using namespace levattn;
using oracle::Mat;

TEST(Planted, DeterministicBySeed) {
  PlantedOptions o;
  o.n = 500;
  o.d = 16;
  o.seed = 3;
  const PlantedInstance a = planted(o), b = planted(o);
  EXPECT_EQ(a.K.data, b.K.data);
  EXPECT_EQ(a.Q.data, b.Q.data);
  EXPECT_EQ(a.relevant, b.relevant);
  o.seed = 4;
  EXPECT_NE(planted(o).K.data, a.K.data);
}

TEST(Planted, StructureIsAsDocumented) {
  PlantedOptions o;
  o.n = 8192;
  o.d = 32;
  o.relevant = 5;
  o.seed = 1;
  const PlantedInstance p = planted(o);
  ASSERT_EQ(p.relevant.size(), 5u);
  const LeverageScores s = leverage_scores(p.K.view());
  for (index_t j : p.relevant) EXPECT_NEAR(s.scores[j], 0.8, 0.05);  // documented: about 0.8
  double noise_max = 0;
  for (index_t j = 0; j < o.n; ++j)
    if (!std::binary_search(p.relevant.begin(), p.relevant.end(), j)) noise_max = std::max(noise_max, s.scores[j]);
  EXPECT_LT(noise_max, 20.0 * 32 / 8192);
  // Softmax attention of each query concentrates on its planted key.
  AttentionOptions full;
  AttentionOptions lev;
  lev.select = Select::leverage;
  lev.top_k = 5;
  lev.return_selection = true;
  AttentionResult r;
  const auto approx = attention(p.Q.view(), p.K.view(), p.V.view(), lev, &r);
  EvaluateOptions heavy;
  heavy.heavy_eps = 0.5;
  const Evaluation m = selection_metrics(p.Q.view(), p.K.view(), p.V.view(), approx.data(), lev, r.selection, heavy);
  EXPECT_GT(m.kernel_mass, 0.9);
  EXPECT_NEAR(m.kernel_mass, m.softmax_mass, 1e-6);  // the softmax kernel at its default scale
  EXPECT_EQ(m.kernel_heavy_recall, 1.0);
  EXPECT_EQ(m.kernel_heavy, o.n);  // one heavy entry per query, its planted key
}

TEST(Planted, RejectsBadOptions) {
  PlantedOptions o;
  o.n = 10;
  o.d = 4;
  o.relevant = 5;  // > d
  EXPECT_THROW(planted(o), Error);
  o.relevant = 2;
  o.noise = 0;
  EXPECT_THROW(planted(o), Error);
  o.noise = 1;
  o.n = 0;
  EXPECT_THROW(planted(o), Error);
}

TEST(Metrics, AgreeWithDirectComputation) {
  const Mat Q = oracle::gaussian(60, 4, 1), K = oracle::gaussian(200, 4, 2), V = oracle::gaussian(200, 3, 3);
  AttentionOptions o;
  o.select = Select::leverage;
  o.top_k = 20;
  o.window = 2;
  o.return_selection = true;
  AttentionResult r;
  const auto approx = attention(Q.view(), K.view(), V.view(), o, &r);
  const double eps = 0.05;
  EvaluateOptions eo;
  eo.heavy_eps = eps;
  const Evaluation m = selection_metrics(Q.view(), K.view(), V.view(), approx.data(), o, r.selection, eo);
  // Direct: full softmax rows in float64.
  const double scale = 0.5;
  std::set<index_t> S(r.selection.shared_keys[0].begin(), r.selection.shared_keys[0].end());
  const auto sel = [&](index_t i, index_t j) { return S.count(j) || (j >= i - 2 && j <= i + 2); };
  const auto full = oracle::attention(Q, K, V, true, scale, 2, [](index_t, index_t) { return true; });
  double mass = 0, err2 = 0, ref2 = 0;
  index_t heavy = 0, heavy_sel = 0;
  for (index_t i = 0; i < 60; ++i) {
    double mx = -INFINITY, z = 0;
    for (index_t j = 0; j < 200; ++j) mx = std::max(mx, scale * oracle::dot(Q, i, K, j));
    for (index_t j = 0; j < 200; ++j) z += std::exp(scale * oracle::dot(Q, i, K, j) - mx);
    for (index_t j = 0; j < 200; ++j) {
      const double a = std::exp(scale * oracle::dot(Q, i, K, j) - mx) / z;
      if (sel(i, j)) mass += a;
      if (a >= eps) {
        ++heavy;
        heavy_sel += sel(i, j);
      }
    }
    for (index_t c = 0; c < 3; ++c) {
      err2 += std::pow(approx[i * 3 + c] - full[i * 3 + c], 2);
      ref2 += std::pow(full[i * 3 + c], 2);
    }
  }
  EXPECT_EQ(m.kernel_heavy, heavy);
  EXPECT_NEAR(m.kernel_heavy_recall, static_cast<double>(heavy_sel) / static_cast<double>(heavy), 1e-12);
  EXPECT_NEAR(m.kernel_mass, mass / 60, 1e-5);
  EXPECT_NEAR(m.output_error, std::sqrt(err2 / ref2), 1e-4);
  // The full selection captures everything.
  AttentionOptions f;
  f.return_selection = true;
  AttentionResult rf;
  const auto exact = attention(Q.view(), K.view(), V.view(), f, &rf);
  const Evaluation mf = selection_metrics(Q.view(), K.view(), V.view(), exact.data(), f, rf.selection, eo);
  EXPECT_NEAR(mf.kernel_mass, 1.0, 1e-5);
  EXPECT_EQ(mf.kernel_heavy_recall, 1.0);
  EXPECT_LT(mf.output_error, 1e-5);
  // The power kernel: mass and heavy entries of |s|^p / sum |s|^p (scale 1), not of softmax.
  AttentionOptions pw = o;
  pw.kernel = Kernel::power, pw.p = 3.0;
  const auto approx_p = attention(Q.view(), K.view(), V.view(), pw, &r);
  const Evaluation mp = selection_metrics(Q.view(), K.view(), V.view(), approx_p.data(), pw, r.selection, eo);
  std::set<index_t> Sp(r.selection.shared_keys[0].begin(), r.selection.shared_keys[0].end());
  double mass_p = 0;
  index_t heavy_p = 0;
  for (index_t i = 0; i < 60; ++i) {
    double z = 0;
    for (index_t j = 0; j < 200; ++j) z += std::pow(std::fabs(oracle::dot(Q, i, K, j)), 3.0);
    for (index_t j = 0; j < 200; ++j) {
      const double a = std::pow(std::fabs(oracle::dot(Q, i, K, j)), 3.0) / z;
      if (Sp.count(j) || (j >= i - 2 && j <= i + 2)) mass_p += a;
      heavy_p += a >= eps;
    }
  }
  EXPECT_NEAR(mp.kernel_mass, mass_p / 60, 1e-5);
  EXPECT_EQ(mp.kernel_heavy, heavy_p);
  EXPECT_EQ(mp.power_heavy, m.power_heavy);  // |x|^4 entries: free of the kernel
}
