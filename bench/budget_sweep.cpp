// Fixed versus n^C-adaptive key budgets: how the error of sparse softmax attention changes with
// the context length n (docs/budgets.md). For each data set and n it runs four selections
//   topk     fixed k = k0            exact per-query top-k (the oracle, O(m n d))
//   topk     adaptive k = ceil(alpha n^C)
//   leverage+window  fixed k = k0    top-k keys by leverage score plus a local window of 16
//   leverage+window  adaptive k
// and prints, as CSV on stdout, the relative output error ||O - O_full||_F / ||O_full||_F and
// the attention mass captured, both measured on a fixed subset of at most --queries query rows
// (every (n / queries)-th query), against full attention over all n keys. Data sets: `planted`
// (levattn::planted), `random` (Gaussian Q, K, V) and `peaked` (`random` with each query scaled
// so that its logits have standard deviation 1.5 sqrt(2 ln n)).
//
// Run: build/bench/levattn_budget_sweep [--alpha A] [--c C] [--k0 K] [--max-n N] [--queries M]
#include <CLI/CLI.hpp>
#include <Random123/philox.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "levattn/levattn.hpp"

namespace {

using levattn::index_t;

constexpr index_t kDim = 64;
constexpr index_t kWindow = 16;
constexpr index_t kRelevant = 8;
constexpr std::uint64_t kSeed = 20240601;
// `peaked`: each query is rescaled so that its logits q.k / sqrt(d) over Gaussian keys are
// exactly N(0, sigma_n^2) with sigma_n = kPeakC sqrt(2 ln n); kPeakC > 1 puts the softmax rows in
// the regime where a few top logits dominate (docs/budgets.md).
constexpr double kPeakC = 1.5;

struct Settings {
  double alpha = 1.0;
  double c = 0.5;
  index_t k0 = 32;
  index_t max_n = 65536;
  index_t queries = 2048;
};

// Options by CLI11; exits 2 (with the message) on a bad one, 0 after --help.
Settings parse(int argc, char** argv) {
  Settings s;
  CLI::App app{"levattn_budget_sweep: fixed against n^C-adaptive key budgets (docs/budgets.md); n runs over "
               "the powers of two from 1024 to min(--max-n, 65536); CSV goes to stdout"};
  app.add_option("--alpha", s.alpha, "alpha of k = ceil(alpha n^C), > 0 (default 1)")->check(CLI::PositiveNumber);
  app.add_option("--c", s.c, "C, in (0, 1] (default 0.5)")->check(CLI::Range(1e-12, 1.0));
  app.add_option("--k0", s.k0, "the fixed budget, >= 1 (default 32)")->check(CLI::PositiveNumber);
  app.add_option("--max-n", s.max_n, "largest n, >= 1024 (default 65536)")->check(CLI::Range(index_t{1024}, index_t{1} << 40));
  app.add_option("--queries", s.queries, "queries per instance, >= 1 (default 2048)")->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    std::exit(app.exit(e) == 0 ? 0 : 2);
  }
  return s;
}

// Gaussian n x d matrix with N(0, 1) entries: Philox4x32-10 (Random123, the generator the
// library uses) keyed by (seed, stream), Box-Muller on two 53-bit uniforms per entry. A pure
// function of (seed, stream, n, d) on any machine.
levattn::DenseMatrix<float> gaussian(index_t n, index_t d, std::uint64_t seed, std::uint32_t stream) {
  const r123::Philox4x32::key_type key = {
      {static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
  const r123::Philox4x32 philox;
  levattn::DenseMatrix<float> m(n, d);
  for (index_t i = 0; i < n * d; ++i) {
    const auto u = static_cast<std::uint64_t>(i);
    const r123::Philox4x32::ctr_type ctr = {
        {static_cast<std::uint32_t>(u), static_cast<std::uint32_t>(u >> 32), stream, 0}};
    const auto r = philox(ctr, key);
    const std::uint64_t a = (static_cast<std::uint64_t>(r[0]) << 32) | r[1];
    const std::uint64_t b = (static_cast<std::uint64_t>(r[2]) << 32) | r[3];
    const double u1 = 1.0 - static_cast<double>(a >> 11) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(b >> 11) * 0x1.0p-53;
    m.data[static_cast<std::size_t>(i)] =
        static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }
  return m;
}

struct Instance {
  levattn::DenseMatrix<float> Q, K, V;
};

Instance make_instance(const std::string& data, index_t n) {
  if (data == "planted") {
    levattn::PlantedOptions po;
    po.n = n;
    po.d = kDim;
    po.relevant = kRelevant;
    po.seed = kSeed;
    levattn::PlantedInstance p = levattn::planted(po);
    return {std::move(p.Q), std::move(p.K), std::move(p.V)};
  }
  Instance inst{gaussian(n, kDim, kSeed, 1), gaussian(n, kDim, kSeed, 2), gaussian(n, kDim, kSeed, 3)};
  if (data == "peaked") {
    // The queries of `random`, each scaled to norm sigma_n sqrt(d): given q, the logit
    // q.k / sqrt(d) of a key with N(0, 1) entries is then N(0, sigma_n^2).
    const double sigma = kPeakC * std::sqrt(2.0 * std::log(static_cast<double>(n)));
    for (index_t i = 0; i < n; ++i) {
      float* q = inst.Q.row(i);
      double norm2 = 0.0;
      for (index_t j = 0; j < kDim; ++j) norm2 += static_cast<double>(q[j]) * static_cast<double>(q[j]);
      const double f = sigma * std::sqrt(static_cast<double>(kDim) / norm2);
      for (index_t j = 0; j < kDim; ++j) q[j] = static_cast<float>(f * static_cast<double>(q[j]));
    }
  }
  return inst;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Row {
  index_t k = 0;
  levattn::Evaluation metrics;
  double seconds = 0.0;
};

// Exact per-query top-k for the query subset Qs (its rows are independent of their positions).
Row run_topk(const levattn::DenseMatrix<float>& Qs, const Instance& inst, levattn::AttentionOptions o) {
  o.select = levattn::Select::topk;
  o.return_selection = true;
  levattn::AttentionResult res;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<float> out = levattn::attention(Qs.view(), inst.K.view(), inst.V.view(), o, &res);
  Row row;
  row.seconds = seconds_since(t0);
  row.k = res.top_k;
  row.metrics = levattn::selection_metrics(Qs.view(), inst.K.view(), inst.V.view(), out.data(), o, res.selection);
  return row;
}

// Leverage top-k plus a window. The window compares query index with key index, so it runs on
// all n queries (O(n (k + w) d), cheap) and the evaluated rows are then taken from the output.
// selection_metrics is given each evaluated query's own key set (shared keys plus the window
// around its true position p) as a per-query selection, so that its mass captured uses the
// window of position p rather than of the row's index in the subset.
Row run_leverage_window(const levattn::DenseMatrix<float>& Qs, const std::vector<index_t>& positions,
                        const Instance& inst, levattn::AttentionOptions o) {
  const index_t n = inst.K.rows, dv = inst.V.cols, m = Qs.rows;
  o.select = levattn::Select::leverage;
  o.window = kWindow;
  o.return_selection = true;
  levattn::AttentionResult res;
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<float> out_all = levattn::attention(inst.Q.view(), inst.K.view(), inst.V.view(), o, &res);
  Row row;
  row.seconds = seconds_since(t0);
  row.k = res.top_k;

  std::vector<float> approx(static_cast<std::size_t>(m * dv));
  for (index_t r = 0; r < m; ++r)
    std::copy_n(out_all.data() + positions[r] * dv, dv, approx.data() + r * dv);
  const std::vector<index_t>& shared = res.selection.shared_keys.at(0);
  const index_t width = static_cast<index_t>(shared.size()) + 2 * kWindow + 1;
  levattn::Selection per_query;
  per_query.m = m, per_query.n = n, per_query.top_k = width;
  per_query.batch = per_query.heads = 1;
  per_query.query_keys.reserve(static_cast<std::size_t>(m * width));
  for (index_t r = 0; r < m; ++r) {
    const index_t p = positions[r];
    const index_t j0 = std::max<index_t>(0, p - kWindow), j1 = std::min(n - 1, p + kWindow);
    const std::size_t begin = per_query.query_keys.size();
    per_query.query_keys.insert(per_query.query_keys.end(), shared.begin(), shared.end());
    for (index_t j = j0; j <= j1; ++j) per_query.query_keys.push_back(j);
    // Pad to a common width with a key already in the set (the metric uses a membership mask).
    per_query.query_keys.resize(begin + static_cast<std::size_t>(width), p);
  }
  row.metrics = levattn::selection_metrics(Qs.view(), inst.K.view(), inst.V.view(), approx.data(),
                                           levattn::KernelOptions{}, per_query);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  const Settings s = parse(argc, argv);
  std::fprintf(stderr, "levattn_budget_sweep: d = %lld, window = %lld, alpha = %g, C = %g, k0 = %lld, queries <= %lld\n",
               static_cast<long long>(kDim), static_cast<long long>(kWindow), s.alpha, s.c,
               static_cast<long long>(s.k0), static_cast<long long>(s.queries));
  std::printf("data,n,method,budget,k,output_error,mass_captured,seconds\n");
  std::fflush(stdout);
  try {
    for (const std::string data : {"planted", "random", "peaked"}) {
      for (index_t n = 1024; n <= std::min<index_t>(s.max_n, 65536); n *= 2) {
        const auto t_n = std::chrono::steady_clock::now();
        const Instance inst = make_instance(data, n);
        const index_t m = std::min(n, s.queries), stride = n / m;
        std::vector<index_t> positions(static_cast<std::size_t>(m));
        levattn::DenseMatrix<float> Qs(m, kDim);
        for (index_t r = 0; r < m; ++r) {
          positions[r] = r * stride;
          std::copy_n(inst.Q.row(positions[r]), kDim, Qs.row(r));
        }
        levattn::AttentionOptions fixed, adaptive;
        fixed.top_k = s.k0;
        adaptive.budget_alpha = s.alpha;
        adaptive.budget_exponent = s.c;
        auto print = [&](const char* method, const char* budget, const Row& row) {
          std::printf("%s,%lld,%s,%s,%lld,%.6e,%.6f,%.4f\n", data.c_str(), static_cast<long long>(n),
                      method, budget, static_cast<long long>(row.k), row.metrics.output_error,
                      row.metrics.kernel_mass, row.seconds);
          std::fflush(stdout);
        };
        print("topk", "fixed", run_topk(Qs, inst, fixed));
        print("topk", "adaptive", run_topk(Qs, inst, adaptive));
        print("leverage+window", "fixed", run_leverage_window(Qs, positions, inst, fixed));
        print("leverage+window", "adaptive", run_leverage_window(Qs, positions, inst, adaptive));
        std::fprintf(stderr, "levattn_budget_sweep: %s n = %lld done (%.1f s)\n", data.c_str(),
                     static_cast<long long>(n), seconds_since(t_n));
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "levattn_budget_sweep: %s\n", e.what());
    return 1;
  }
  return 0;
}
