// Quality against time of the selections at one budget: for each selection, the time of
// attention() next to the dense reference's (same run), the recall of the exact per-query top-k
// keys and the softmax mass captured, measured on sampled queries against the full attention row.
//   build/bench/levattn_selection_bench [--n 16384] [--d 64] [--top-k 256] [--data mixture|gaussian]
//                                       [--probes 0,...] [--samples 256] [--seed S]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::bench::median;
using levattn::bench::seconds;

using levattn::AttentionOptions;
using levattn::index_t;
using levattn::Select;


// Gaussian keys and queries, or a mixture: points around 64 random centres (sd 1/2 of theirs),
// the shape of keys that fall into groups, which clustered selection is built for.
std::vector<float> inputs(index_t n, index_t d, const std::string& data, std::mt19937_64& g,
                          const std::vector<float>& centres) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<std::size_t>(n * d));
  const index_t c = static_cast<index_t>(centres.size()) / d;
  for (index_t i = 0; i < n; ++i) {
    const index_t k = data == "mixture" ? static_cast<index_t>(g() % static_cast<std::uint64_t>(c)) : -1;
    for (index_t a = 0; a < d; ++a)
      x[i * d + a] = (k >= 0 ? centres[k * d + a] + 0.5f * nd(g) : nd(g)) / std::sqrt(2.0f);
  }
  return x;
}

struct Quality {
  double recall = 0.0, mass = 0.0;
};

// Recall of the exact top-k and softmax mass of query i's selection, from its full logit row.
Quality quality(const levattn::Selection& s, const std::vector<float>& q, const std::vector<float>& k, index_t d,
                index_t i, index_t top_k) {
  const index_t n = s.n;
  std::vector<double> logit(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) {
    double dot = 0.0;
    for (index_t a = 0; a < d; ++a) dot += static_cast<double>(q[i * d + a]) * k[j * d + a];
    logit[j] = dot / std::sqrt(static_cast<double>(d));
  }
  std::vector<char> chosen(static_cast<std::size_t>(n));
  s.mask_row(0, i, chosen.data());
  const double mx = *std::max_element(logit.begin(), logit.end());
  double z = 0.0, in = 0.0;
  for (index_t j = 0; j < n; ++j) {
    const double w = std::exp(logit[j] - mx);
    z += w;
    in += chosen[j] ? w : 0.0;
  }
  std::vector<index_t> order(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) order[j] = j;
  std::nth_element(order.begin(), order.begin() + (top_k - 1), order.end(),
                   [&](index_t a, index_t b) { return logit[a] > logit[b]; });
  double hits = 0.0;
  for (index_t a = 0; a < top_k; ++a) hits += chosen[order[a]];
  return {hits / static_cast<double>(top_k), in / z};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_selection_bench: recall and mass against time for each selection"};
  index_t n = 16384, d = 64, top_k = 256, samples = 256;
  std::string data = "mixture";
  std::vector<index_t> probes{0};
  unsigned seed = 0;
  app.add_option("--n", n, "tokens (queries = keys)")->check(CLI::PositiveNumber);
  app.add_option("--d", d, "head dimension")->check(CLI::PositiveNumber);
  app.add_option("--top-k", top_k, "key budget, and the k of the exact top-k recalled")->check(CLI::PositiveNumber);
  app.add_option("--data", data, "mixture (64 centres) or gaussian")->check(CLI::IsMember({"mixture", "gaussian"}));
  app.add_option("--probes", probes, "cluster: clusters searched per query (0: the default)")->delimiter(',');
  app.add_option("--samples", samples, "queries whose recall and mass are measured")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "seed of the inputs");
  CLI11_PARSE(app, argc, argv);
  try {
    std::mt19937_64 g(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> centres(static_cast<std::size_t>(64 * d));
    for (float& x : centres) x = nd(g);
    const std::vector<float> q = inputs(n, d, data, g, centres), k = inputs(n, d, data, g, centres),
                             v = inputs(n, d, "gaussian", g, centres);
    std::vector<float> out(q.size());
    const levattn::Tensor4Ref Q{q.data(), 1, 1, n, d}, K{k.data(), 1, 1, n, d}, V{v.data(), 1, 1, n, d};
    double selecting = 0.0;  // of the last time_of: the selection's share
    const auto time_of = [&](const AttentionOptions& o) {
      levattn::attention(Q, K, V, out.data(), o);  // warm-up
      const auto t0 = std::chrono::steady_clock::now();
      selecting = levattn::attention(Q, K, V, out.data(), o).seconds_selection;
      return seconds(t0);
    };
    const double dense = time_of(AttentionOptions{});
    std::vector<std::pair<std::string, AttentionOptions>> configs;
    AttentionOptions o;
    o.select = Select::leverage, o.top_k = top_k;
    configs.emplace_back("leverage top-k", o);
    o = {}, o.select = Select::window, o.window = top_k / 2;
    configs.emplace_back("window", o);
    o = {}, o.select = Select::topk, o.top_k = top_k;
    configs.emplace_back("exact top-k", o);
    for (index_t p : probes) {
      o = {}, o.select = Select::cluster, o.top_k = top_k, o.probe = p;
      configs.emplace_back("cluster probe " + std::to_string(p), o);
    }
    nlohmann::json rows = nlohmann::json::array();
    std::printf("n = %lld, d = %lld, budget %lld, %s data; dense reference %.3f s\n", static_cast<long long>(n),
                static_cast<long long>(d), static_cast<long long>(top_k), data.c_str(), dense);
    for (const auto& [name, opt] : configs) {
      const double t = time_of(opt);
      const levattn::Selection s = levattn::select_keys(Q, K, opt);
      Quality sum;
      for (index_t a = 0; a < samples; ++a) {
        const Quality one = quality(s, q, k, d, a * n / samples, top_k);
        sum.recall += one.recall / static_cast<double>(samples);
        sum.mass += one.mass / static_cast<double>(samples);
      }
      std::printf("  %-22s %8.3f s (selecting %.3f s)  %6.1f%% of dense  recall %.3f  mass %.3f\n", name.c_str(), t,
                  selecting, 100.0 * t / dense, sum.recall, sum.mass);
      rows.push_back({{"selection", name}, {"seconds", t}, {"selection_seconds", selecting}, {"fraction_of_dense", t / dense},
                      {"recall_of_exact_topk", sum.recall}, {"mass_captured", sum.mass}});
    }
    std::cout << nlohmann::json{{"n", n}, {"d", d}, {"top_k", top_k}, {"data", data}, {"dense_seconds", dense},
                                {"rows", rows}}
                     .dump()
              << "\n";
  } catch (const levattn::Error& e) {
    std::fprintf(stderr, "levattn_selection_bench: %s\n", e.what());
    return 2;
  }
  return 0;
}
