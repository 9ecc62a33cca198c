// The two searches of heavy_entries (x^2, exact normalisers) against each other: the exact one
// (every key of U_eps, one GEMM) and the countsketch one (math.md 1.9). For each d and eps: the
// time of each over the same queries, |U|, the sketch's rows t and buckets b, the candidates it
// verified, its recall and precision against the exact entries, and the modelled cost per query
// of each (exact |U| d; sketch t b d + |U| t + candidates d / m multiply-adds); each search's time
// is the call over m queries less the call over one (the fixed part). Keys: n x d with
// log-normal norms (so that U_eps is not empty); queries: the first m of another such draw.
// Prints one JSON object.
//   build/bench/levattn_heavy_search_bench [--n 65536] [--m 4096] [--d 64,128,256]
//                                          [--eps 0.01,0.001] [--delta 0.01]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "key_kinds.hpp"
#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::index_t;

nlohmann::json run(index_t n, index_t m, index_t d, double eps, double delta) {
  const std::vector<float> k = bench::make_keys("lognormal", n, d, 1), q = bench::make_keys("lognormal", m, d, 2);
  const levattn::ConstMatrix K{k.data(), n, d}, Q{q.data(), m, d};
  const levattn::ConstMatrix Q1{q.data(), 1, d};
  levattn::HeavyOptions o;
  // Each search's time beyond the fixed part (scores, the factor of K, the sketch of U): the
  // call over m queries less the call over one.
  const auto timed = [&](const levattn::ConstMatrix& queries, levattn::HeavyEntries* out) {
    const auto t0 = std::chrono::steady_clock::now();
    levattn::HeavyEntries h = levattn::heavy_entries(queries, K, eps, o);
    const double s = levattn::bench::seconds(t0);
    if (out) *out = std::move(h);
    return s;
  };
  levattn::HeavyEntries exact, sketched;
  const double t_exact = timed(Q, &exact), t_exact_search = t_exact - timed(Q1, nullptr);
  o.search = levattn::HeavySearch::countsketch;
  o.delta = delta;
  const double t_sketch = timed(Q, &sketched), t_sketch_search = t_sketch - timed(Q1, nullptr);
  const levattn::HeavyAgreement a = levattn::compare_heavy_entries(sketched, exact);
  const double u = static_cast<double>(exact.universal_size), t = static_cast<double>(sketched.sketch_rows),
               b = static_cast<double>(sketched.sketch_buckets), dd = static_cast<double>(d);
  const double model_exact = u * dd;
  const double model_sketch = t * b * dd + u * t + static_cast<double>(sketched.candidates) * dd / static_cast<double>(m);
  std::fprintf(stderr, "d %3lld eps %-6g |U| %6.0f  exact %8.4f s (search %8.4f)  countsketch %8.4f s (search %8.4f, "
                       "%.1fx)  t %2.0f b %6.0f  candidates %lld  recall %.3f precision %.3f  model %.1fx\n",
               static_cast<long long>(d), eps, u, t_exact, t_exact_search, t_sketch, t_sketch_search,
               t_sketch_search / t_exact_search, t, b, static_cast<long long>(sketched.candidates), a.recall,
               a.precision, model_sketch / model_exact);
  return {{"d", d}, {"eps", eps}, {"universal_size", exact.universal_size}, {"entries", exact.entries.size()},
          {"exact_seconds", t_exact}, {"countsketch_seconds", t_sketch}, {"exact_search_seconds", t_exact_search},
          {"countsketch_search_seconds", t_sketch_search}, {"search_countsketch_over_exact", t_sketch_search / t_exact_search},
          {"sketch_rows", sketched.sketch_rows}, {"sketch_buckets", sketched.sketch_buckets},
          {"candidates", sketched.candidates}, {"recall", a.recall}, {"precision", a.precision},
          {"model_madds_per_query_exact", model_exact}, {"model_madds_per_query_countsketch", model_sketch}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_heavy_search_bench: the exact and the countsketch heavy-entry search"};
  index_t n = 65536, m = 4096;
  std::vector<index_t> dims{64, 128, 256};
  std::vector<double> epss{0.01, 0.001};
  double delta = 0.01;
  app.add_option("--n", n, "keys")->check(CLI::PositiveNumber);
  app.add_option("--m", m, "queries (the sketch's cost per query is the same for any m)")->check(CLI::PositiveNumber);
  app.add_option("--d", dims, "head dimensions")->delimiter(',');
  app.add_option("--eps", epss, "heaviness thresholds in (0, 1]")->delimiter(',');
  app.add_option("--delta", delta, "the sketch's failure probability in (0, 1)");
  CLI11_PARSE(app, argc, argv);
  try {
    nlohmann::json report = {{"build", levattn::to_string(levattn::build_info())}, {"n", n}, {"m", m}, {"delta", delta}};
    for (const index_t d : dims)
      for (const double eps : epss) report["runs"].push_back(run(n, m, d, eps, delta));
    std::printf("%s\n", report.dump(1).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "levattn_heavy_search_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
