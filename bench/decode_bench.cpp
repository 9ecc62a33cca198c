// Decoding with the KV cache against full attention over the whole cache, in the same run: a
// context of n tokens per head is appended, then each of `steps` decoding steps appends one token
// and attends one query per query head. Prints one JSON object.
//   build/bench/levattn_decode_bench [--n 65536] [--d 64] [--heads 8] [--kv-heads 8,2]
//                                    [--eps 0.01,0.05] [--keys gaussian,spiky,lognormal] [--steps 128]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>
#include <vector>

#include "key_kinds.hpp"
#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::bench::median;
using levattn::bench::seconds;

using levattn::index_t;
using Clock = std::chrono::steady_clock;


// (kv_heads, rows, d) keys of one distribution, head h drawn with seed + h.
std::vector<float> stack(const std::string& kind, index_t heads, index_t rows, index_t d, std::uint64_t seed) {
  std::vector<float> out;
  for (index_t h = 0; h < heads; ++h) {
    const std::vector<float> k = bench::make_keys(kind, rows, d, seed + static_cast<std::uint64_t>(h));
    out.insert(out.end(), k.begin(), k.end());
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_decode_bench: KV cache decoding against full attention over the cache"};
  index_t n = 65536, d = 64, heads = 8, steps = 128, window = 64, sinks = 4;
  std::vector<index_t> kv_list{8, 2};
  std::vector<double> eps_list{0.01, 0.05};
  std::vector<std::string> kinds{"gaussian", "spiky", "lognormal"};
  app.add_option("--n", n, "context tokens before decoding")->check(CLI::PositiveNumber);
  app.add_option("--d", d, "key and value dimension")->check(CLI::PositiveNumber);
  app.add_option("--heads", heads, "query heads")->check(CLI::PositiveNumber);
  app.add_option("--kv-heads", kv_list, "kv heads (each divides --heads)")->delimiter(',');
  app.add_option("--eps", eps_list, "cache thresholds")->delimiter(',');
  app.add_option("--keys", kinds, "key distributions: gaussian, spiky, lognormal")->delimiter(',');
  app.add_option("--steps", steps, "decoding steps timed")->check(CLI::PositiveNumber);
  app.add_option("--window", window, "recent tokens always kept")->check(CLI::NonNegativeNumber);
  app.add_option("--sinks", sinks, "first tokens always kept")->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);

  nlohmann::json report;
  report["n"] = n, report["d"] = d, report["heads"] = heads, report["steps"] = steps;
  report["window"] = window, report["sinks"] = sinks;
  report["threads"] = omp_get_max_threads();
  report["isa"] = levattn::build_info().isa;
  const index_t total = n + steps;
  const std::vector<float> Q = bench::make_keys("gaussian", steps * heads, d, 99);
  for (const index_t kv : kv_list) {
    for (const std::string& kind : kinds) {
      const std::vector<float> K = stack(kind, kv, total, d, 1000), V = stack("gaussian", kv, total, d, 2000);
      // Full attention over the whole cache, grouped as the cache attends: the heads / kv query
      // heads of kv head g are consecutive, so (1, heads, 1, d) reads as (1, kv, heads / kv, d).
      const index_t group = heads / kv;
      std::vector<float> full_out(static_cast<std::size_t>(heads * d));
      auto t0 = Clock::now();
      for (index_t s = 0; s < steps; ++s)
        levattn::attention({Q.data() + s * heads * d, 1, kv, group, d}, {K.data(), 1, kv, total, d},
                           {V.data(), 1, kv, total, d}, full_out.data(), {});
      const double t_full = seconds(t0) / static_cast<double>(steps);
      for (const double eps : eps_list) {
        levattn::KVCacheOptions o;
        o.eps = eps, o.window = window, o.sinks = sinks;
        levattn::KVCache cache(1, kv, d, d, o);
        // The context, appended in blocks of 4096 tokens (strided rows: one block per head).
        std::vector<float> kb, vb;
        t0 = Clock::now();
        for (index_t t = 0; t < n; t += 4096) {
          const index_t rows = std::min<index_t>(4096, n - t);
          kb.clear(), vb.clear();
          for (index_t g = 0; g < kv; ++g) {
            kb.insert(kb.end(), K.begin() + (g * total + t) * d, K.begin() + (g * total + t + rows) * d);
            vb.insert(vb.end(), V.begin() + (g * total + t) * d, V.begin() + (g * total + t + rows) * d);
          }
          cache.append({kb.data(), 1, kv, rows, d}, {vb.data(), 1, kv, rows, d});
        }
        const double t_fill = seconds(t0);
        std::vector<float> out(static_cast<std::size_t>(heads * d)), k1(static_cast<std::size_t>(kv * d)), v1(k1.size());
        double t_append = 0.0, t_attend = 0.0, kept = 0.0;
        for (index_t s = 0; s < steps; ++s) {
          for (index_t g = 0; g < kv; ++g) {
            std::copy_n(K.begin() + (g * total + n + s) * d, d, k1.begin() + g * d);
            std::copy_n(V.begin() + (g * total + n + s) * d, d, v1.begin() + g * d);
          }
          t0 = Clock::now();
          cache.append({k1.data(), 1, kv, 1, d}, {v1.data(), 1, kv, 1, d});
          t_append += seconds(t0);
          t0 = Clock::now();
          const levattn::KVCacheReport r = cache.attend({Q.data() + s * heads * d, 1, heads, 1, d}, out.data());
          t_attend += seconds(t0);
          for (index_t c : r.kept) kept += static_cast<double>(c);
        }
        nlohmann::json row;
        row["kv_heads"] = kv, row["keys"] = kind, row["eps"] = eps;
        row["seconds_per_token_full"] = t_full;
        row["seconds_per_token_attend"] = t_attend / static_cast<double>(steps);
        row["speedup"] = t_full / (t_attend / static_cast<double>(steps));
        row["seconds_per_token_append"] = t_append / static_cast<double>(steps);
        row["seconds_context_append"] = t_fill;
        row["mean_kept_per_kv_head"] = kept / static_cast<double>(steps * kv);
        row["cache_bytes"] = cache.bytes();
        row["full_cache_bytes"] = static_cast<double>(kv * total * 2 * d) * 4.0;
        report["runs"].push_back(row);
        std::cerr << "kv " << kv << " " << kind << " eps " << eps << ": " << row["speedup"].get<double>() << "x, kept "
                  << row["mean_kept_per_kv_head"].get<double>() << "\n";
      }
    }
  }
  std::cout << report.dump(2) << "\n";
}
