// The bfloat16 products (AttentionOptions::precision = bfloat16) against float32: for dense
// attention and leverage top-256 over n keys (one head, m = n queries, d = dv = 64, Gaussian Q,
// K, V), each call timed in interleaved rounds (median), the ratio of the float32 time to the
// bfloat16 time, the same ratio of the attention parts alone (AttentionResult::seconds_attention:
// the selection is float32 either way), and each path's relative error ||O - O64||_F / ||O64||_F
// against float64 attention over the same selection on every (n / queries)-th query. Prints one
// JSON object and a line per case on stderr; on a CPU without AVX512_BF16 (or with
// LEVATTN_ISA=avx2) both paths are float32 and the ratios are about 1.
//   build/bench/levattn_bf16_bench [--n 4096,16384] [--rounds 5] [--queries 256]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::index_t;
using levattn::bench::Clock;
using levattn::bench::median;
using levattn::bench::seconds;

constexpr index_t kDim = 64;

// ||O - O64||_F / ||O64||_F over rows 0, step, 2 step, ... of O (n x kDim).
double relative_error(const std::vector<float>& out, const std::vector<double>& ref, index_t step) {
  double num = 0.0, den = 0.0;
  for (std::size_t r = 0; r * kDim < ref.size(); ++r)
    for (index_t x = 0; x < kDim; ++x) {
      const double e = out[(r * static_cast<std::size_t>(step)) * kDim + x] - ref[r * kDim + x];
      num += e * e, den += ref[r * kDim + x] * ref[r * kDim + x];
    }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_bf16_bench: bfloat16 products against float32, time and error"};
  std::vector<index_t> sizes{4096, 16384};
  int rounds = 5;
  index_t queries = 256;
  app.add_option("--n", sizes, "key counts (queries = keys)")->delimiter(',');
  app.add_option("--rounds", rounds, "interleaved timing rounds (median reported)")->check(CLI::PositiveNumber);
  app.add_option("--queries", queries, "queries checked against float64")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    nlohmann::json rows = nlohmann::json::array();
    for (const index_t n : sizes) {
      std::mt19937_64 g(static_cast<std::uint64_t>(n));
      std::normal_distribution<float> nd(0.0f, 1.0f);
      std::vector<float> q(static_cast<std::size_t>(n * kDim)), k(q.size()), v(q.size()), out(q.size());
      for (auto* x : {&q, &k, &v})
        for (float& e : *x) e = nd(g);
      const levattn::Tensor4Ref Q{q.data(), 1, 1, n, kDim}, K{k.data(), 1, 1, n, kDim}, V{v.data(), 1, 1, n, kDim};
      // The checked queries (every step-th) in float64, over the selection each spec makes.
      const index_t step = std::max<index_t>(1, n / queries), checked = (n + step - 1) / step;
      std::vector<double> q64(static_cast<std::size_t>(checked * kDim)), k64(k.begin(), k.end()), v64(v.begin(), v.end());
      for (index_t r = 0; r < checked; ++r)
        for (index_t x = 0; x < kDim; ++x) q64[r * kDim + x] = q[(r * step) * kDim + x];
      for (const std::string spec : {"full", "leverage:256"}) {
        levattn::AttentionOptions f32 = levattn::parse_selection(spec), b16 = f32;
        b16.precision = levattn::Precision::bfloat16;
        levattn::Selection sel = levattn::select_keys(Q, K, f32);
        // The float64 reference attends the same keys: the shared set as the checked rows see it.
        levattn::Selection checked_rows = levattn::selection_layout({1, 1, checked, n, kDim, kDim, 1}, f32);
        checked_rows.shared_keys = sel.shared_keys;
        std::vector<double> ref(static_cast<std::size_t>(checked * kDim)), stat(static_cast<std::size_t>(checked));
        levattn::selected_attention_forward<double>({1, 1, checked, n, kDim, kDim, 1}, checked_rows, f32, q64.data(), k64.data(),
                                                    v64.data(), ref.data(), stat.data());
        std::vector<double> t32, t16, a32, a16;  // whole calls; their attention part
        double e32 = 0.0, e16 = 0.0;
        for (int r = 0; r <= rounds; ++r) {  // round 0: warm-up
          auto t0 = Clock::now();
          double part = levattn::attention(Q, K, V, out.data(), f32).seconds_attention;
          if (r > 0) t32.push_back(seconds(t0)), a32.push_back(part);
          e32 = relative_error(out, ref, step);
          t0 = Clock::now();
          part = levattn::attention(Q, K, V, out.data(), b16).seconds_attention;
          if (r > 0) t16.push_back(seconds(t0)), a16.push_back(part);
          e16 = relative_error(out, ref, step);
        }
        const double s32 = median(t32), s16 = median(t16), p32 = median(a32), p16 = median(a16);
        std::fprintf(stderr,
                     "n = %lld %-14s float32 %8.4f s (error %.2e)  bf16 %8.4f s (error %.2e)  float32 / bf16 %.2f, "
                     "attention part %.2f\n",
                     static_cast<long long>(n), spec.c_str(), s32, e32, s16, e16, s32 / s16, p32 / p16);
        rows.push_back({{"n", n}, {"selection", spec}, {"float32_s", s32}, {"bf16_s", s16}, {"speedup", s32 / s16},
                        {"attention_part_speedup", p32 / p16}, {"float32_error", e32}, {"bf16_error", e16}});
      }
    }
    std::printf("%s\n", nlohmann::json{{"bf16_products", levattn::bf16_products()}, {"d", kDim}, {"rows", rows}}.dump().c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "levattn_bf16_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
