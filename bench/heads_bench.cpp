// Attention at the shapes of a small model: many (batch, head) pairs of a few hundred tokens.
// Times every selection against `full` in the same run (interleaved rounds, medians), and the
// cost of the leverage selection alone per head. Prints one JSON object.
//   build/bench/levattn_heads_bench [--batch 64] [--heads 4] [--n 197] [--d 16] [--top-k 32]
//                                   [--rounds 15] [--threads T] [--seed S]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::bench::median;
using levattn::bench::seconds;

using levattn::index_t;



}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_heads_bench: selections against full attention at small-model shapes"};
  index_t batch = 64, heads = 4, n = 197, d = 16, top_k = 32;
  int rounds = 15, threads = 0;
  unsigned seed = 0;
  app.add_option("--batch", batch, "batch size")->check(CLI::PositiveNumber);
  app.add_option("--heads", heads, "heads")->check(CLI::PositiveNumber);
  app.add_option("--n", n, "tokens (queries = keys)")->check(CLI::PositiveNumber);
  app.add_option("--d", d, "head dimension")->check(CLI::PositiveNumber);
  app.add_option("--top-k", top_k, "keys per head of leverage / random, per query of topk / cluster")->check(CLI::PositiveNumber);
  app.add_option("--rounds", rounds, "interleaved timing rounds (median reported)")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "OpenMP threads (default: OpenMP's)")->check(CLI::NonNegativeNumber);
  app.add_option("--seed", seed, "seed of the Gaussian inputs");
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) omp_set_num_threads(threads);

  try {
    const index_t count = batch * heads * n * d;
    std::mt19937_64 gen(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(static_cast<std::size_t>(count)), k(q.size()), v(q.size()), out(q.size());
    for (auto* a : {&q, &k, &v})
      for (float& x : *a) x = normal(gen);
    const levattn::Tensor4Ref Q{q.data(), batch, heads, n, d}, K{k.data(), batch, heads, n, d},
        V{v.data(), batch, heads, n, d};

    std::map<std::string, levattn::AttentionOptions> runs;
    runs["full"] = {};
    auto& lev = runs["leverage"];
    lev.select = levattn::Select::leverage;
    lev.top_k = top_k;
    auto& rnd = runs["random"];
    rnd.select = levattn::Select::random;
    rnd.top_k = top_k;
    auto& win = runs["window"];
    win.select = levattn::Select::window;
    win.window = top_k / 2;
    auto& topk = runs["topk"];
    topk.select = levattn::Select::topk;
    topk.top_k = top_k;
    auto& clus = runs["cluster"];
    clus.select = levattn::Select::cluster;
    clus.top_k = top_k;

    // The leverage selection alone: scores and top-k of every head, one head after another.
    const auto select_all = [&] {
      for (index_t b = 0; b < batch; ++b)
        for (index_t h = 0; h < heads; ++h)
          (void)levattn::universal_set_top_k(levattn::leverage_scores(K.slice(b, h)), top_k);
    };
    std::map<std::string, std::vector<double>> times;
    for (auto& [name, o] : runs) levattn::attention(Q, K, V, out.data(), o);  // warm-up
    select_all();
    for (int r = 0; r < rounds; ++r) {
      for (auto& [name, o] : runs) {
        const auto t0 = std::chrono::steady_clock::now();
        levattn::attention(Q, K, V, out.data(), o);
        times[name].push_back(seconds(t0));
      }
      const auto t0 = std::chrono::steady_clock::now();
      select_all();
      times["selection_only"].push_back(seconds(t0));
    }

    nlohmann::ordered_json j;
    j["shape"] = {batch, heads, n, d};
    j["top_k"] = top_k;
    j["threads"] = omp_get_max_threads();
    j["isa"] = levattn::build_info().isa;
    j["rounds"] = rounds;
    const double full = median(times["full"]);
    for (const auto& [name, t] : times) {
      if (name == "selection_only") continue;
      const double s = median(t);
      j["seconds"][name] = s;
      j["speedup_over_full"][name] = full / s;
    }
    j["leverage_selection_us_per_head"] =
        median(times["selection_only"]) / static_cast<double>(batch * heads) * 1e6;
    std::printf("%s\n", j.dump().c_str());
  } catch (const levattn::Error& e) {
    std::fprintf(stderr, "levattn_heads_bench: %s\n", e.what());
    return 2;
  }
  return 0;
}
