// Causal LevAttention against the dense causal reference in the same run: softmax attention of
// n queries over keys 0 .. i, d = dv = 64, with the causal eps-sets plus a window, for several
// key distributions and thresholds. Prints one JSON object.
//   build/bench/levattn_causal_bench [--n 65536] [--d 64] [--eps 0.01,0.05] [--window 64]
//                                    [--repeats 2]
#include <CLI/CLI.hpp>
#include <omp.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "key_kinds.hpp"
#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::bench::median;
using levattn::bench::seconds;

using levattn::index_t;


// Best of `repeats` runs of f (seconds).
template <class F>
double best_of(int repeats, F&& f) {
  double best = 1e300;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, seconds(t0));
  }
  return best;
}

double rel_frobenius(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_causal_bench: causal LevAttention against dense causal attention"};
  index_t n = 65536, d = 64, window = 64;
  int repeats = 2;
  std::vector<double> eps_list{0.01, 0.05};
  std::vector<std::string> kinds{"gaussian", "spiky", "lognormal"};
  app.add_option("--n", n, "queries and keys")->check(CLI::PositiveNumber);
  app.add_option("--d", d, "key and value dimension")->check(CLI::PositiveNumber);
  app.add_option("--eps", eps_list, "thresholds of the causal sets")->delimiter(',');
  app.add_option("--window", window, "local window added to the sets")->check(CLI::NonNegativeNumber);
  app.add_option("--keys", kinds, "key distributions: gaussian, spiky, lognormal")->delimiter(',');
  app.add_option("--repeats", repeats, "runs of each, the best kept")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  nlohmann::json report;
  report["n"] = n, report["d"] = d, report["window"] = window;
  report["threads"] = omp_get_max_threads();
  report["isa"] = levattn::build_info().isa;
  const std::vector<float> Q = bench::make_keys("gaussian", n, d, 1), V = bench::make_keys("gaussian", n, d, 3);
  for (const std::string& kind : kinds) {
    const std::vector<float> K = bench::make_keys(kind, n, d, 2);
    const levattn::Tensor4Ref q{Q.data(), 1, 1, n, d}, k{K.data(), 1, 1, n, d}, v{V.data(), 1, 1, n, d};
    std::vector<float> dense(static_cast<std::size_t>(n * d)), mine(dense.size());
    levattn::AttentionOptions full;
    full.causal = true;
    const double t_dense = best_of(repeats, [&] { levattn::attention(q, k, v, dense.data(), full); });
    for (const double eps : eps_list) {
      levattn::AttentionOptions o;
      o.causal = true, o.select = levattn::Select::leverage, o.eps = eps, o.window = window;
      levattn::AttentionResult res;
      const double t = best_of(repeats, [&] { res = levattn::attention(q, k, v, mine.data(), o); });
      // The most keys before a block that any block's set keeps (the sets end with the block's own keys).
      const levattn::Selection sets = levattn::causal_universal_sets({K.data(), n, d}, eps);
      index_t candidates = 0;
      for (std::size_t r = 0; r < sets.shared_keys.size(); ++r)
        candidates = std::max(candidates, static_cast<index_t>(sets.shared_keys[r].size()) -
                                              (std::min(n, static_cast<index_t>(r + 1) * sets.segment) -
                                               static_cast<index_t>(r) * sets.segment));
      nlohmann::json row;
      row["keys"] = kind, row["eps"] = eps;
      row["seconds_dense_causal"] = t_dense, row["seconds_causal_leverage"] = t;
      row["speedup"] = t_dense / t;
      row["seconds_selection"] = res.seconds_selection;
      row["mean_keys_per_query"] = res.mean_keys_per_query;
      row["dense_mean_keys_per_query"] = (static_cast<double>(n) + 1.0) / 2.0;
      row["max_candidates"] = candidates;
      row["output_rel_error"] = rel_frobenius(mine, dense);
      report["runs"].push_back(row);
      std::cerr << kind << " eps " << eps << ": " << t_dense / t << "x\n";
    }
  }
  std::cout << report.dump(2) << "\n";
}
