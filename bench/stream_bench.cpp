// The streaming universal set against the offline one: total time over n keys in blocks against
// leverage_scores + universal_set on the whole matrix (same run), and the peak workspace at two
// sizes of stream (keys generated block by block, never held whole). Prints one JSON object.
//   build/bench/levattn_stream_bench [--n 1048576] [--d 64] [--eps 0.01] [--block 65536]
//                                    [--small 100000] [--large 10000000]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <vector>

#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::bench::median;
using levattn::bench::seconds;

using levattn::index_t;


// Keys i0 .. i0 + rows - 1 of a fixed stream: small Gaussian noise, and one key in 4096 with a
// large entry (the keys a universal set keeps). A pure function of (seed, i0, rows).
void keys(index_t i0, index_t rows, index_t d, std::uint64_t seed, std::vector<float>& out) {
  out.resize(static_cast<std::size_t>(rows * d));
  std::mt19937_64 g(seed ^ static_cast<std::uint64_t>(i0));
  std::normal_distribution<float> nd(0.0f, 0.05f);
  for (index_t i = 0; i < rows; ++i) {
    for (index_t x = 0; x < d; ++x) out[i * d + x] = nd(g);
    if ((i0 + i) % 4096 == 0) out[i * d + (i0 + i) / 4096 % d] += 16.0f;
  }
}

std::size_t stream_peak(index_t n, index_t d, double eps, index_t block) {
  levattn::StreamingUniversalSet s(d, 0, eps);
  std::vector<float> kb;
  for (index_t i = 0; i < n; i += block) {
    const index_t rows = std::min(block, n - i);
    keys(i, rows, d, 7, kb);
    s.push({kb.data(), rows, d});
  }
  return s.peak_workspace_bytes();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_stream_bench: streaming against offline universal sets"};
  index_t n = 1 << 20, d = 64, block = 65536, small = 100000, large = 10000000;
  double eps = 0.01;
  app.add_option("--n", n, "keys of the timed comparison")->check(CLI::PositiveNumber);
  app.add_option("--d", d, "key dimension")->check(CLI::PositiveNumber);
  app.add_option("--eps", eps, "eps of the universal set");
  app.add_option("--block", block, "keys per push")->check(CLI::PositiveNumber);
  app.add_option("--small", small, "keys of the smaller workspace run")->check(CLI::PositiveNumber);
  app.add_option("--large", large, "keys of the larger workspace run (0: skip)")->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    std::vector<float> K;
    keys(0, n, d, 7, K);
    const levattn::ConstMatrix Km{K.data(), n, d};
    (void)levattn::universal_set(Km, eps);  // warm-up
    auto t0 = std::chrono::steady_clock::now();
    const levattn::UniversalSet offline = levattn::universal_set(Km, eps);
    const double t_offline = seconds(t0);
    t0 = std::chrono::steady_clock::now();
    levattn::StreamingUniversalSet s(d, 0, eps);
    for (index_t i = 0; i < n; i += block) s.push({K.data() + i * d, std::min(block, n - i), d});
    const levattn::UniversalSet streamed = s.universal_set();
    const double t_stream = seconds(t0);
    nlohmann::ordered_json j;
    j["n"] = n, j["d"] = d, j["eps"] = eps, j["block"] = block;
    j["set_size"] = offline.indices.size();
    j["identical"] = streamed.indices == offline.indices && streamed.scores == offline.scores;
    j["offline_seconds"] = t_offline, j["stream_seconds"] = t_stream, j["stream_over_offline"] = t_stream / t_offline;
    j["peak_workspace_bytes"] = s.peak_workspace_bytes();
    j["key_matrix_bytes"] = K.size() * sizeof(float);
    if (large > 0) {
      const std::size_t a = stream_peak(small, d, eps, block), b = stream_peak(large, d, eps, block);
      j["peak_small"] = {{"n", small}, {"bytes", a}};
      j["peak_large"] = {{"n", large}, {"bytes", b}};
      j["peak_large_over_small"] = static_cast<double>(b) / static_cast<double>(a);
    }
    std::cout << j.dump() << "\n";
  } catch (const levattn::Error& e) {
    std::fprintf(stderr, "levattn_stream_bench: %s\n", e.what());
    return 2;
  }
  return 0;
}
