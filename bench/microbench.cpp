// Microbenchmarks of the building blocks, each next to the BLAS operation it should be compared
// with. Run: build/bench/levattn_microbench --benchmark_filter=... (see docs/benchmarks.md).
#include <benchmark/benchmark.h>
#include <cblas.h>

#include <random>
#include <vector>

#include "levattn/levattn.hpp"

namespace {

std::vector<float> gaussian(std::int64_t count, unsigned seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> v(static_cast<std::size_t>(count));
  for (auto& x : v) x = dist(gen);
  return v;
}

// Exact leverage scores of an n x d Gaussian K.
void BM_LeverageScores(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  const auto K = gaussian(n * d, 1);
  for (auto _ : state) {
    auto s = levattn::leverage_scores(levattn::ConstMatrix{K.data(), n, d});
    benchmark::DoNotOptimize(s.scores.data());
  }
  state.counters["rows/s"] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

// The reference: one SGEMM computing K^T K for the same K.
void BM_GemmKtK(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = state.range(1);
  const auto K = gaussian(n * d, 1);
  std::vector<float> M(static_cast<std::size_t>(d * d));
  for (auto _ : state) {
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(d), static_cast<int>(d),
                static_cast<int>(n), 1.0f, K.data(), static_cast<int>(d), K.data(),
                static_cast<int>(d), 0.0f, M.data(), static_cast<int>(d));
    benchmark::DoNotOptimize(M.data());
  }
  state.counters["rows/s"] = benchmark::Counter(static_cast<double>(n), benchmark::Counter::kIsIterationInvariantRate);
}

// LevAttention forward (top-k leverage selection included) for one head.
void BM_LevAttention(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = 64, k = state.range(1);
  const auto Q = gaussian(n * d, 1), K = gaussian(n * d, 2), V = gaussian(n * d, 3);
  levattn::AttentionOptions o;
  o.select = levattn::Select::leverage;
  o.top_k = k;
  std::vector<float> out(static_cast<std::size_t>(n * d));
  const levattn::Tensor4Ref q{Q.data(), 1, 1, n, d}, kk{K.data(), 1, 1, n, d}, v{V.data(), 1, 1, n, d};
  for (auto _ : state) {
    auto r = levattn::attention(q, kk, v, out.data(), o);
    benchmark::DoNotOptimize(out.data());
    state.counters["selection_s"] = r.seconds_selection;
    state.counters["attention_s"] = r.seconds_attention;
  }
}

// The dense reference (tiled online softmax) for one head.
void BM_DenseAttention(benchmark::State& state) {
  const std::int64_t n = state.range(0), d = 64;
  const auto Q = gaussian(n * d, 1), K = gaussian(n * d, 2), V = gaussian(n * d, 3);
  std::vector<float> out(static_cast<std::size_t>(n * d));
  const levattn::Tensor4Ref q{Q.data(), 1, 1, n, d}, kk{K.data(), 1, 1, n, d}, v{V.data(), 1, 1, n, d};
  for (auto _ : state) {
    levattn::attention(q, kk, v, out.data(), {});
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(4.0 * static_cast<double>(n) * static_cast<double>(n) * d * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_LeverageScores)->Args({1024, 16})->Args({1 << 14, 64})->Args({1 << 20, 64})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_GemmKtK)->Args({1 << 14, 64})->Args({1 << 20, 64})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_LevAttention)->Args({1 << 14, 256})->Args({1 << 16, 256})->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_DenseAttention)->Arg(1 << 12)->Arg(1 << 14)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_MAIN();
