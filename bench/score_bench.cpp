// Exact against sketched leverage scores on one Gaussian K: median times (after a warm-up run)
// and the measured accuracy of the sketch. Prints one JSON object.
//   build/bench/levattn_score_bench [--n N] [--d D] [--sketch countsketch|srht|gaussian]
//                                   [--gamma G] [--repeats R] [--seed S]
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
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--n") n = std::atoll(v.c_str());
    else if (k == "--d") d = std::atoll(v.c_str());
    else if (k == "--repeats") repeats = std::atoll(v.c_str());
    else if (k == "--seed") seed = std::atoll(v.c_str());
    else if (k == "--gamma") gamma = std::atof(v.c_str());
    else if (k == "--sketch") sketch = v;
    else {
      std::fprintf(stderr, "levattn_score_bench: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (n < 1 || d < 1 || repeats < 1) {
    std::fprintf(stderr, "levattn_score_bench: expected n, d, repeats >= 1\n");
    return 2;
  }
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
    std::printf(
        "{\"n\":%lld,\"d\":%lld,\"sketch\":\"%s\",\"sketch_size\":%lld,\"stated_gamma\":%.4f,"
        "\"seconds\":{\"exact\":%.4f,\"sketch\":%.4f},\"speedup\":%.2f,"
        "\"max_rel_error\":%.4f,\"mean_rel_error\":%.5f,\"exact_rel_error_bound\":%.3g}\n",
        n, d, sketch.c_str(), static_cast<long long>(sk.sketch_size), sk.rel_error_bound, t_exact,
        t_sketch, t_exact / t_sketch, worst, mean, exact.rel_error_bound);
  } catch (const levattn::Error& e) {
    std::fprintf(stderr, "levattn_score_bench: %s\n", e.what());
    return e.kind() == levattn::ErrorKind::internal ? 1 : 2;
  }
  return 0;
}
