// Exact against sketched leverage scores on one Gaussian K: median times (after a warm-up run)
// and the measured accuracy of the sketch. Prints one JSON object.
//   build/bench/levattn_score_bench [--n N] [--d D] [--sketch countsketch|srht|gaussian]
//                                   [--gamma G] [--repeats R] [--seed S]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "levattn/levattn.hpp"

namespace {

template <class F>
double median_seconds(int repeats, F&& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  long long n = 1 << 20, d = 512, repeats = 3, seed = 0;
  double gamma = 0.2;
  std::string sketch = "countsketch";
  CLI::App app{"levattn_score_bench: exact against sketched leverage scores, one JSON object"};
  app.add_option("--n", n, "keys (default 2^20)")->check(CLI::PositiveNumber);
  app.add_option("--d", d, "dimension (default 512)")->check(CLI::PositiveNumber);
  app.add_option("--repeats", repeats, "timed runs, the median is reported (default 3)")->check(CLI::PositiveNumber);
  app.add_option("--seed", seed, "seed of the keys and of the sketch (default 0)")->check(CLI::NonNegativeNumber);
  app.add_option("--gamma", gamma, "target accuracy of the sketch, in (0, 1) (default 0.2)");
  app.add_option("--sketch", sketch, "countsketch (default), srht or gaussian")
      ->check(CLI::IsMember({"countsketch", "srht", "gaussian"}));
  CLI11_PARSE(app, argc, argv);
  try {
    // Gaussian K from the planted generator's noise (relevant = 1 planted key).
    levattn::PlantedOptions po;
    po.n = n;
    po.d = d;
    po.relevant = 1;
    po.m = 1;
    po.seed = static_cast<std::uint64_t>(seed);
    const levattn::PlantedInstance p = levattn::planted(po);
    const levattn::ConstMatrix K = p.K.view();
    levattn::LeverageScores exact, sk;
    const double t_exact = median_seconds(static_cast<int>(repeats), [&] { exact = levattn::leverage_scores(K); });
    levattn::LeverageOptions o;
    o.method = levattn::ScoreMethod::sketch;
    o.sketch = levattn::parse_sketch_kind(sketch);
    o.gamma = gamma;
    o.seed = static_cast<std::uint64_t>(seed);
    const double t_sketch = median_seconds(static_cast<int>(repeats), [&] { sk = levattn::leverage_scores(K, o); });
    double worst = 0.0, mean = 0.0;
    for (long long j = 0; j < n; ++j) {
      const double e = std::fabs(sk.scores[j] - exact.scores[j]) / exact.scores[j];
      worst = std::max(worst, e);
      mean += e;
    }
    mean /= static_cast<double>(n);
    nlohmann::ordered_json j;
    j["n"] = n;
    j["d"] = d;
    j["sketch"] = sketch;
    j["sketch_size"] = sk.sketch_size;
    j["stated_gamma"] = sk.rel_error_bound;
    j["seconds"] = {{"exact", t_exact}, {"sketch", t_sketch}};
    j["speedup"] = t_exact / t_sketch;
    j["max_rel_error"] = worst;
    j["mean_rel_error"] = mean;
    j["exact_rel_error_bound"] = exact.rel_error_bound;
    std::printf("%s\n", j.dump().c_str());
  } catch (const levattn::Error& e) {
    std::fprintf(stderr, "levattn_score_bench: %s\n", e.what());
    return e.kind() == levattn::ErrorKind::internal ? 1 : 2;
  }
  return 0;
}
