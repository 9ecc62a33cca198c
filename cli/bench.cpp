// `levattn bench` and `levattn demo`: timing and the end-to-end report.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <memory>
#include <random>

#include "cli/cli.hpp"

namespace levattn::cli {
namespace {

std::vector<float> gaussian(index_t count, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (auto& x : v) x = dist(gen);
  return v;
}

double seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void require_positive(index_t v, const char* name) {
  if (v < 1) throw Error(ErrorKind::invalid_argument, name, "expected an integer >= 1, got " + std::to_string(v));
}

struct BenchArgs {
  index_t n = 16384, d = 64, heads = 1, top_k = 256;
  int repeats = 5;
  std::int64_t seed = 0;
  bool json = false;
};

struct DemoArgs {
  index_t n = 16384, d = 64, relevant = 8, top_k = 256;
  double eps = 0.1;
  std::int64_t seed = 0;
  bool json = false;
};

int run_bench(const BenchArgs& a) {
  require_positive(a.n, "n");
  require_positive(a.d, "d");
  require_positive(a.heads, "heads");
  require_positive(a.top_k, "top-k");
  if (a.repeats < 1) throw Error(ErrorKind::invalid_argument, "repeats", "expected an integer >= 1");
  // Q, K, V and the output: four (heads, n, d) float32 arrays, checked before any is formed.
  const index_t total = checked_allocation({4, a.heads, a.n, a.d}, sizeof(float), "bench: Q, K, V and the output") / 4;
  const index_t n = a.n, d = a.d, h = a.heads;
  const auto seed = static_cast<std::uint64_t>(a.seed);
  const std::vector<float> q = gaussian(total, seed), k = gaussian(total, seed + 1), v = gaussian(total, seed + 2);
  const Tensor4Ref Q{q.data(), 1, h, n, d}, K{k.data(), 1, h, n, d}, V{v.data(), 1, h, n, d};
  std::vector<float> out(static_cast<std::size_t>(total));
  Progress progress("levattn bench");
  const int steps = 5;
  int step = 0;
  const auto advance = [&] { progress(static_cast<double>(++step) / steps); };

  const double t_lev = median_seconds(a.repeats, [&] {
    for (index_t i = 0; i < h; ++i) (void)leverage_scores(K.slice(0, i));
  });
  advance();
  AttentionOptions lev;
  lev.select = Select::leverage;
  lev.top_k = a.top_k;
  const double t_levattn = median_seconds(a.repeats, [&] { attention(Q, K, V, out.data(), lev); });
  advance();
  AttentionOptions dense;
  const double t_dense = median_seconds(a.repeats, [&] { attention(Q, K, V, out.data(), dense); });
  advance();
  std::vector<float> gram(static_cast<std::size_t>(d * d));
  const double t_gemm = median_seconds(a.repeats, [&] {
    for (index_t i = 0; i < h; ++i)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<blasint>(d), static_cast<blasint>(d),
                  static_cast<blasint>(n), 1.0f, K.slice(0, i).data, static_cast<blasint>(d),
                  K.slice(0, i).data, static_cast<blasint>(d), 0.0f, gram.data(), static_cast<blasint>(d));
  });
  advance();
  constexpr blasint S = 2048;
  const std::vector<float> A = gaussian(S * S, seed + 3), B = gaussian(S * S, seed + 4);
  std::vector<float> C(static_cast<std::size_t>(S) * S);
  const double t_sgemm = median_seconds(std::max(a.repeats, 3), [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, S, S, S, 1.0f, A.data(), S, B.data(), S,
                0.0f, C.data(), S);
  });
  advance();

  const double nn = static_cast<double>(n), dd = static_cast<double>(d), hh = static_cast<double>(h);
  const double dense_gflops = 4.0 * nn * nn * dd * hh / t_dense * 1e-9;
  const double sgemm_gflops = 2.0 * std::pow(static_cast<double>(S), 3) / t_sgemm * 1e-9;
  // LevAttention's own rate: its work, 4 n k d (logits and weighted values over k keys) plus
  // 2 n d^2 (the Gram K^T K of its scores), over its whole time, selection included.
  const double kk = static_cast<double>(std::min(a.top_k, n));
  const double levattn_gflops = (4.0 * nn * kk * dd + 2.0 * nn * dd * dd) * hh / t_levattn * 1e-9;
  json j;
  j["n"] = n;
  j["d"] = d;
  j["heads"] = h;
  j["top_k"] = a.top_k;
  j["threads"] = build_info().threads;
  j["blas_core"] = build_info().blas_core;
  j["repeats"] = a.repeats;
  j["seconds"] = {{"leverage_scores", t_lev},
                  {"levattention_forward", t_levattn},
                  {"dense_forward", t_dense},
                  {"gemm_ktk", t_gemm},
                  {"sgemm_2048", t_sgemm}};
  j["speedup"] = t_dense / t_levattn;
  j["leverage_over_gemm"] = t_lev / t_gemm;
  j["dense_gflops"] = dense_gflops;
  j["sgemm_gflops"] = sgemm_gflops;
  j["dense_gemm_efficiency"] = dense_gflops / sgemm_gflops;
  j["levattention_gflops"] = levattn_gflops;
  j["levattention_gemm_efficiency"] = levattn_gflops / sgemm_gflops;
  if (a.json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("n = %lld, d = %lld, heads = %lld, top-k = %lld, %d threads, BLAS core %s\n",
              static_cast<long long>(n), static_cast<long long>(d), static_cast<long long>(h),
              static_cast<long long>(a.top_k), build_info().threads, build_info().blas_core.c_str());
  std::printf("  leverage scores        %10.4f s  (%.2fx one K^T K GEMM, %.4f s)\n", t_lev, t_lev / t_gemm, t_gemm);
  std::printf("  LevAttention forward   %10.4f s  (selection included; %.1f GFLOP/s of 4 n k d + 2 n d^2, %.2f of "
              "the SGEMM rate)\n", t_levattn, levattn_gflops, levattn_gflops / sgemm_gflops);
  std::printf("  dense forward          %10.4f s  (%.1f GFLOP/s)\n", t_dense, dense_gflops);
  std::printf("  speed-up               %10.1fx\n", t_dense / t_levattn);
  std::printf("  SGEMM 2048^3           %10.4f s  (%.1f GFLOP/s); dense efficiency %.2f\n", t_sgemm,
              sgemm_gflops, dense_gflops / sgemm_gflops);
  return 0;
}

int run_demo(const DemoArgs& a) {
  require_positive(a.n, "n");
  require_positive(a.d, "d");
  require_positive(a.top_k, "top-k");
  PlantedOptions po;
  po.n = a.n;
  po.d = a.d;
  po.relevant = std::min({a.relevant, a.n, a.d});
  po.seed = static_cast<std::uint64_t>(a.seed);
  const PlantedInstance p = planted(po);
  const ConstMatrix Q = p.Q.view(), K = p.K.view(), V = p.V.view();
  Progress progress("levattn demo");

  auto t0 = std::chrono::steady_clock::now();
  const UniversalSet U = universal_set(K, a.eps);
  const double t_universal = seconds(t0);
  const bool planted_found = std::includes(U.indices.begin(), U.indices.end(), p.relevant.begin(), p.relevant.end());
  progress(0.1);

  t0 = std::chrono::steady_clock::now();
  const HeavyEntries heavy = heavy_entries(Q, K, a.eps);
  const double t_heavy = seconds(t0);
  progress(0.2);
  t0 = std::chrono::steady_clock::now();
  const HeavyEntries brute = heavy_entries_brute_force(Q, K, a.eps);
  const double t_brute = seconds(t0);
  progress(0.4);
  const HeavyAgreement agree = compare_heavy_entries(heavy, brute);
  const double recall = agree.recall, precision = agree.precision, max_rel = agree.max_rel_value_error;

  AttentionOptions lev;
  lev.select = Select::leverage;
  lev.top_k = a.top_k;
  lev.return_selection = true;
  AttentionResult lev_result;
  std::vector<float> o_lev, o_dense;
  // Median of 3 after a warm-up call, as in `levattn bench`.
  const double t_lev = median_seconds(3, [&] { o_lev = attention(Q, K, V, lev, &lev_result); });
  progress(0.5);
  const double t_dense = median_seconds(3, [&] { o_dense = attention(Q, K, V, AttentionOptions{}); });
  progress(0.8);
  EvaluateOptions threshold;
  threshold.heavy_eps = a.eps;
  const Evaluation mt = selection_metrics(Q, K, V, o_lev.data(), lev, lev_result.selection, threshold);
  progress(1.0);

  json j;
  j["n"] = a.n;
  j["d"] = a.d;
  j["relevant"] = po.relevant;
  j["eps"] = a.eps;
  j["universal"] = {{"size", U.indices.size()}, {"rank", U.rank}, {"bound", std::floor(static_cast<double>(U.rank) / a.eps)}, {"contains_planted", planted_found}, {"seconds", t_universal}};
  j["heavy"] = {{"count", heavy.entries.size()}, {"brute_force_count", brute.entries.size()}, {"recall", recall}, {"precision", precision}, {"max_rel_value_error", max_rel}, {"seconds", t_heavy}, {"brute_force_seconds", t_brute}};
  j["attention"] = {{"top_k", a.top_k}, {"heavy_recall", mt.kernel_heavy_recall}, {"mass_captured", mt.kernel_mass}, {"output_error", mt.output_error}, {"levattention_seconds", t_lev}, {"dense_seconds", t_dense}, {"speedup", t_dense / t_lev}};
  if (a.json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::printf("levattn demo: planted instance, n = %lld keys and queries, d = %lld, %lld planted keys (seed %llu)\n\n",
              static_cast<long long>(a.n), static_cast<long long>(a.d), static_cast<long long>(po.relevant),
              static_cast<unsigned long long>(po.seed));
  std::printf("universal set (x^2, eps = %g)\n", a.eps);
  std::printf("  |U| = %zu of n = %lld keys (bound rank/eps = %.0f); planted keys all in U: %s   [%.3f s]\n\n",
              U.indices.size(), static_cast<long long>(a.n), std::floor(static_cast<double>(U.rank) / a.eps),
              planted_found ? "yes" : "NO", t_universal);
  std::printf("heavy entries of x^2 attention (A_ij >= %g)\n", a.eps);
  std::printf("  levattn: %zu entries in %.3f s; brute force: %zu entries in %.3f s (%.0fx slower)\n",
              heavy.entries.size(), t_heavy, brute.entries.size(), t_brute, t_brute / t_heavy);
  std::printf("  recall %.4f, precision %.4f, max relative value difference %.2e\n\n", recall, precision, max_rel);
  std::printf("softmax attention: LevAttention (top %lld keys by leverage score) against dense\n",
              static_cast<long long>(a.top_k));
  std::printf("  heavy recall (A_ij >= %g)  %.4f\n", a.eps, mt.kernel_heavy_recall);
  std::printf("  attention mass captured    %.4f\n", mt.kernel_mass);
  std::printf("  relative output error      %.2e\n", mt.output_error);
  std::printf("  LevAttention %.4f s, dense %.4f s: %.1fx faster (median of 3 runs)\n", t_lev, t_dense,
              t_dense / t_lev);
  return 0;
}

}  // namespace

Command add_bench(CLI::App& app) {
  auto a = std::make_shared<BenchArgs>();
  auto* sub = app.add_subcommand("bench", "time LevAttention, dense attention and BLAS");
  sub->add_option("--n", a->n, "context length (default 16384)");
  sub->add_option("--d", a->d, "head dimension (default 64)");
  sub->add_option("--heads", a->heads, "heads (default 1)");
  sub->add_option("--top-k", a->top_k, "keys per head (default 256)");
  sub->add_option("--repeats", a->repeats, "timed runs, the median is reported (default 5)");
  add_seed_option(sub, a->seed, "the random inputs");
  add_json_flag(sub, a->json, "the results");
  return {sub, [a] { return run_bench(*a); }};
}

Command add_demo(CLI::App& app) {
  auto a = std::make_shared<DemoArgs>();
  auto* sub = app.add_subcommand("demo", "planted instance: universal set, heavy entries, LevAttention vs dense");
  sub->add_option("--n", a->n, "context length (default 16384)");
  sub->add_option("--d", a->d, "dimension (default 64)");
  sub->add_option("--top-k", a->top_k, "LevAttention keys (default 256)");
  sub->add_option("--eps", a->eps, "heavy-entry threshold (default 0.1)");
  add_seed_option(sub, a->seed, "the planted instance");
  add_json_flag(sub, a->json, "the results");
  return {sub, [a] { return run_demo(*a); }};
}

}  // namespace levattn::cli
