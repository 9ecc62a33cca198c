// Heavy keys kept exactly plus the rest sampled (math.md 1.8) against the other ways of spending
// the same key budget B per query: the selection alone (leverage:B), leverage with a residual
// part (leverage:B - R + residual:R for R = B/4, B/2, 3B/4), a window with sinks (B keys), and
// uniform sampling alone, shared per head (random:B, HyperAttention's light part) or per query
// (B keys drawn per block of 256 queries from all keys, sample_residual on an empty selection).
// Self-attention, m = n queries over n keys (d = 64): each method's time is the median of its
// whole attention call (selection included) over the seeds; its error, the mean over the seeds of
// ||O - O_full||_F / ||O_full||_F on every (n / queries)-th query, against full attention of those
// queries (whose time, scaled to n queries, is the dense figure). Key sets: `gaussian` (Gaussian
// Q, K, V: flat softmax rows), `lognormal` (keys with log-normal norms: a few keys dominate) and
// `planted` (levattn::planted: each query aligned with one of 8 planted keys); values shifted by 1
// (shift_values). Prints one JSON object; a line per method on stderr.
//   build/bench/levattn_residual_bench [--n 16384,65536] [--budget 256] [--queries 1024]
//                                      [--seeds 3] [--data gaussian,lognormal,planted]
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "key_kinds.hpp"
#include "levattn/levattn.hpp"
#include "timing.hpp"

namespace {

using levattn::index_t;

constexpr index_t kDim = 64;

struct Data {
  std::vector<float> q, k, v;
};

Data make_data(const std::string& kind, index_t n) {
  if (kind == "planted") {
    levattn::PlantedOptions po;
    po.n = n, po.d = kDim, po.seed = 7;
    levattn::PlantedInstance p = levattn::planted(po);
    return {std::move(p.Q.data), std::move(p.K.data), std::move(p.V.data)};
  }
  return {bench::make_keys("gaussian", n, kDim, 1), bench::make_keys(kind, n, kDim, 2), bench::make_keys("gaussian", n, kDim, 3)};
}

// Values shifted by 1 in every coordinate: a row's output then has a norm of order 1 whatever
// the row (zero-mean values average to about 0 over a flat row, where any relative error is
// large). Attention of a convex kind moves every output by the same shift, so the absolute
// errors stay those of the unshifted values.
void shift_values(std::vector<float>& v) {
  for (float& x : v) x += 1.0f;
}

// Rows 0, step, 2 step, ... of x (rows of width w).
std::vector<float> every(const std::vector<float>& x, index_t w, index_t step, index_t count) {
  std::vector<float> out(static_cast<std::size_t>(count * w));
  for (index_t r = 0; r < count; ++r) std::copy_n(x.begin() + r * step * w, w, out.begin() + r * w);
  return out;
}

double rel_error(const std::vector<float>& out, index_t step, const std::vector<float>& ref) {
  double num = 0.0, den = 0.0;
  const index_t rows = static_cast<index_t>(ref.size()) / kDim;
  for (index_t r = 0; r < rows; ++r)
    for (index_t x = 0; x < kDim; ++x) {
      const double a = out[static_cast<std::size_t>(r * step * kDim + x)], b = ref[static_cast<std::size_t>(r * kDim + x)];
      num += (a - b) * (a - b), den += b * b;
    }
  return std::sqrt(num / den);
}

struct Method {
  std::string name, spec;  // spec empty: uniform sampling alone, one draw per block of queries
};

nlohmann::json run(const std::string& kind, index_t n, index_t budget, index_t queries, int seeds) {
  Data data = make_data(kind, n);
  shift_values(data.v);
  const index_t step = n / queries;
  const levattn::Tensor4Ref Q{data.q.data(), 1, 1, n, kDim}, K{data.k.data(), 1, 1, n, kDim}, V{data.v.data(), 1, 1, n, kDim};
  const std::vector<float> qs = every(data.q, kDim, step, queries);
  std::vector<float> ref(static_cast<std::size_t>(queries * kDim));
  const auto t0 = std::chrono::steady_clock::now();
  levattn::attention(levattn::Tensor4Ref{qs.data(), 1, 1, queries, kDim}, K, V, ref.data(), levattn::AttentionOptions{});
  const double dense_s = levattn::bench::seconds(t0) * static_cast<double>(step);
  const std::string b = std::to_string(budget), w = std::to_string((budget - 17) / 2);
  const std::vector<Method> methods = {
      {"leverage alone", "leverage:" + b},
      {"leverage + residual B/4", "leverage:" + std::to_string(budget - budget / 4) + "+residual:" + std::to_string(budget / 4)},
      {"leverage + residual B/2", "leverage:" + std::to_string(budget / 2) + "+residual:" + std::to_string(budget / 2)},
      {"leverage + residual 3B/4", "leverage:" + std::to_string(budget / 4) + "+residual:" + std::to_string(budget - budget / 4)},
      {"window + sinks", "window:" + w + "+sinks:16"},
      {"uniform per head (random)", "random:" + b},
      {"uniform per block", ""}};
  nlohmann::json rows = nlohmann::json::array();
  std::vector<float> out(static_cast<std::size_t>(n * kDim)), stat(static_cast<std::size_t>(n));
  double base_s = 0.0;
  for (const Method& m : methods) {
    std::vector<double> times;
    double err = 0.0, err2 = 0.0, keys = 0.0;
    for (int seed = 0; seed < seeds; ++seed) {
      const auto t = std::chrono::steady_clock::now();
      if (m.spec.empty()) {
        levattn::Selection sel;
        sel.batch = 1, sel.heads = 1, sel.m = n, sel.n = n;
        levattn::sample_residual(sel, budget, static_cast<std::uint64_t>(seed));
        levattn::selected_attention_forward<float>({1, 1, n, n, kDim, kDim}, sel, levattn::KernelOptions{}, data.q.data(),
                                                   data.k.data(), data.v.data(), out.data(), stat.data());
        keys = static_cast<double>(budget);
      } else {
        levattn::AttentionOptions o = levattn::parse_selection(m.spec);
        o.seed = static_cast<std::uint64_t>(seed);
        keys = levattn::attention(Q, K, V, out.data(), o).mean_keys_per_query;
      }
      times.push_back(levattn::bench::seconds(t));
      const double e = rel_error(out, step, ref);
      err += e / seeds, err2 += e * e / seeds;
    }
    const double s = levattn::bench::median(times);
    if (base_s == 0.0) base_s = s;
    const double sd = std::sqrt(std::max(0.0, err2 - err * err));
    std::fprintf(stderr, "%-9s n %6lld  %-26s %-32s keys %6.1f  error %.4f (sd %.4f)  %8.4f s  %5.2fx leverage alone  %.4f of dense\n",
                 kind.c_str(), static_cast<long long>(n), m.name.c_str(), m.spec.empty() ? "(residual alone)" : m.spec.c_str(),
                 keys, err, sd, s, s / base_s, s / dense_s);
    rows.push_back({{"method", m.name}, {"spec", m.spec}, {"keys_per_query", keys}, {"error", err}, {"error_sd", sd},
                    {"seconds", s}, {"over_leverage_alone", s / base_s}, {"over_dense", s / dense_s}});
  }
  return {{"data", kind}, {"n", n}, {"dense_seconds_scaled", dense_s}, {"methods", rows}};
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn_residual_bench: heavy keys exact plus the rest sampled, against the selection alone, a "
               "window with sinks and uniform sampling, at one key budget"};
  std::vector<index_t> ns{16384, 65536};
  std::vector<std::string> kinds{"gaussian", "lognormal", "planted"};
  index_t budget = 256, queries = 1024;
  int seeds = 3;
  app.add_option("--n", ns, "context lengths (m = n queries)")->delimiter(',');
  app.add_option("--data", kinds, "key sets: gaussian, lognormal, planted")->delimiter(',');
  app.add_option("--budget", budget, "keys per query, >= 20")->check(CLI::Range(index_t{20}, index_t{1} << 30));
  app.add_option("--queries", queries, "queries the error is measured on (dividing each n)")->check(CLI::PositiveNumber);
  app.add_option("--seeds", seeds, "seeds per method (the time is their median, the error their mean)")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    nlohmann::json report = {{"build", levattn::to_string(levattn::build_info())}, {"budget", budget}, {"queries", queries},
                             {"seeds", seeds}, {"d", kDim}};
    for (const std::string& kind : kinds)
      for (const index_t n : ns) {
        if (n % queries != 0 || n < budget) {
          std::fprintf(stderr, "levattn_residual_bench: n %lld must be >= the budget and a multiple of --queries\n",
                       static_cast<long long>(n));
          return 2;
        }
        report["runs"].push_back(run(kind, n, budget, queries, seeds));
      }
    std::printf("%s\n", report.dump(1).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "levattn_residual_bench: %s\n", e.what());
    return 2;
  }
  return 0;
}
