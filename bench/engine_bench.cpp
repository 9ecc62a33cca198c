// attention() and its two parts: for each shape and selection spec, the median time of attention()
// (selection and attention), of select_keys alone and of the engine alone
// (selected_attention_forward<float> over that selection) and of its backward
// (selected_attention_backward<float>: dQ, dK and dV for a Gaussian output gradient), in
// interleaved rounds, and the largest difference between the two outputs. (select + forward) /
// attention near 1 says attention() adds nothing to its parts; backward_over_forward is the
// backward's cost in forwards (FlashAttention-2's schedule: about 2.5); run against an older
// build, attention_s compares the engines. Prints one JSON object.
//   build/bench/levattn_engine_bench [--cases small,mid,large] [--select SPEC ...] [--rounds 9]
//                                    [--threads T]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::bench::median;
using levattn::bench::seconds;

using levattn::index_t;



struct Case {
  std::string name;
  index_t batch, heads, n, d;
  std::vector<std::string> specs;
};

// The shapes a model meets: many small heads (a ViT), a prefill of a few thousand tokens, and
// one long head.
std::vector<Case> cases_named(const std::string& list) {
  const std::vector<Case> all = {
      {"small", 64, 4, 197, 16, {"full", "leverage:32", "window:16", "topk:32", "cluster:32"}},
      {"mid", 1, 8, 4096, 64, {"full", "leverage:256", "leverage:256+window:16+sinks:4", "topk:256", "cluster:256"}},
      {"large", 1, 1, 16384, 64, {"full", "leverage:256", "window:128"}},
  };
  std::vector<Case> out;
  std::stringstream in(list);
  for (std::string name; std::getline(in, name, ',');) {
    const auto it = std::find_if(all.begin(), all.end(), [&](const Case& c) { return c.name == name; });
    if (it == all.end()) throw CLI::ValidationError("--cases", "unknown case '" + name + "' (small, mid, large)");
    out.push_back(*it);
  }
  return out;
}

nlohmann::json run_case(const Case& c, int rounds, unsigned seed) {
  const index_t count = c.batch * c.heads * c.n * c.d;
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> q(static_cast<std::size_t>(count)), k(q.size()), v(q.size()), out(q.size()), out2(q.size());
  std::vector<float> dout(q.size()), dq(q.size()), dk(q.size()), dv(q.size());
  std::vector<float> stat(static_cast<std::size_t>(c.batch * c.heads * c.n));
  for (auto* a : {&q, &k, &v, &dout})
    for (float& x : *a) x = normal(gen);
  const levattn::Tensor4Ref Q{q.data(), c.batch, c.heads, c.n, c.d}, K{k.data(), c.batch, c.heads, c.n, c.d},
      V{v.data(), c.batch, c.heads, c.n, c.d};
  const levattn::AttentionShape shape{c.batch, c.heads, c.n, c.n, c.d, c.d, c.heads};
  nlohmann::json rows = nlohmann::json::array();
  for (const std::string& spec : c.specs) {
    const levattn::AttentionOptions o = levattn::parse_selection(spec);
    std::vector<double> t_attention, t_select, t_forward, t_backward;
    double max_diff = 0.0;
    for (int r = 0; r < rounds; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      levattn::attention(Q, K, V, out.data(), o);
      t_attention.push_back(seconds(t0));
      t0 = std::chrono::steady_clock::now();
      const levattn::Selection sel = levattn::select_keys(Q, K, o);
      t_select.push_back(seconds(t0));
      t0 = std::chrono::steady_clock::now();
      levattn::selected_attention_forward<float>(shape, sel, o, q.data(), k.data(), v.data(), out2.data(), stat.data());
      t_forward.push_back(seconds(t0));
      t0 = std::chrono::steady_clock::now();
      levattn::selected_attention_backward<float>(shape, sel, o, q.data(), k.data(), v.data(), out2.data(), stat.data(),
                                                  dout.data(), dq.data(), dk.data(), dv.data());
      t_backward.push_back(seconds(t0));
      for (std::size_t i = 0; i < out.size(); ++i) max_diff = std::max(max_diff, static_cast<double>(std::fabs(out[i] - out2[i])));
    }
    const double a = median(t_attention), s = median(t_select), f = median(t_forward), b = median(t_backward);
    rows.push_back({{"selection", spec}, {"attention_s", a}, {"select_keys_s", s}, {"forward_s", f},
                    {"backward_s", b}, {"backward_over_forward", b / f},
                    {"forward_over_attention_part", f / std::max(a - s, 1e-9)},
                    {"select_plus_forward_over_attention", (s + f) / a}, {"max_abs_diff", max_diff}});
    std::fprintf(stderr,
                 "%-6s %-34s attention %9.3f ms  select %8.3f ms  forward %9.3f ms  (s+f)/a %.2f  backward %9.3f ms "
                 "(%.2fx)\n",
                 c.name.c_str(), spec.c_str(), a * 1e3, s * 1e3, f * 1e3, (s + f) / a, b * 1e3, b / f);
  }
  return {{"case", c.name}, {"shape", {c.batch, c.heads, c.n, c.d}}, {"rows", rows}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_engine_bench: attention() against its selection and its engine, per shape and selection"};
  std::string cases = "small,mid,large";
  std::vector<std::string> specs;
  int rounds = 9, threads = 0;
  unsigned seed = 0;
  app.add_option("--cases", cases, "comma-separated: small (64, 4, 197, 16), mid (1, 8, 4096, 64), large (1, 1, 16384, 64)");
  app.add_option("--select", specs, "selection specs to run instead of each case's own (repeatable)");
  app.add_option("--rounds", rounds, "interleaved timing rounds (median reported)")->check(CLI::PositiveNumber);
  app.add_option("--threads", threads, "OpenMP threads (default: OpenMP's)")->check(CLI::NonNegativeNumber);
  app.add_option("--seed", seed, "seed of the Gaussian inputs");
  CLI11_PARSE(app, argc, argv);
  if (threads > 0) omp_set_num_threads(threads);
  try {
    nlohmann::json report = {{"build", levattn::to_string(levattn::build_info())}, {"threads", omp_get_max_threads()}};
    for (Case c : cases_named(cases)) {
      if (!specs.empty()) c.specs = specs;
      report["cases"].push_back(run_case(c, rounds, seed));
    }
    std::printf("%s\n", report.dump(1).c_str());
  } catch (const CLI::ValidationError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "levattn_engine_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
