// levattn reduce: X (n, d) .npy -> Y (n, m) .npy whose softmax Gram matrix approximates X's.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <set>

#include "cli/cli.hpp"

namespace levattn::cli {
namespace {

struct ReduceArgs {
  std::string x, out, method = "gaussian";
  index_t m = 0;  // 0: the method's default
  std::int64_t seed = 0;
  bool json = false;
};

int run_reduce(const ReduceArgs& args) {
  ReduceOptions o;
  o.method = parse_reduce_method(args.method);
  o.m = args.m;
  o.seed = static_cast<std::uint64_t>(args.seed);
  const Input X = load_input(args.x, "x", 2);
  const ConstMatrix x{X.values.data(), X.shape[0], X.shape[1]};
  const auto named = [&](auto&& f) { return with_sources({&X}, {"x"}, f); };
  const auto t0 = std::chrono::steady_clock::now();
  const Reduced r = named([&] { return reduce_dimension(x, o); });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double err = named([&] { return softmax_gram_error(x, r.Y.view()); });
  write_npy(args.out, Array::from_float32({r.Y.rows, r.Y.cols}, r.Y.data));

  const std::size_t distinct = std::set<index_t>(r.columns.begin(), r.columns.end()).size();
  if (args.json) {
    json j;
    j["n"] = x.rows;
    j["d"] = x.cols;
    j["m"] = r.Y.cols;
    j["method"] = to_string(r.method);
    j["seconds"] = secs;
    j["error"] = err;
    if (r.method == ReduceMethod::bss) j["columns"] = distinct;
    std::cout << j.dump() << "\n";
  } else {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3g", err);
    std::cout << "reduce (" << to_string(r.method) << "): n = " << x.rows << ", d = " << x.cols
              << " -> m = " << r.Y.cols;
    if (r.method == ReduceMethod::bss) std::cout << " (" << distinct << " distinct columns of X)";
    std::cout << " in " << secs << " s; softmax Gram error " << buf << "; wrote " << args.out << "\n";
  }
  return 0;
}

}  // namespace

Command add_reduce(CLI::App& app) {
  auto a = std::make_shared<ReduceArgs>();
  ReduceArgs& args = *a;
  auto* cmd = app.add_subcommand(
      "reduce", "reduce the feature dimension of X (n, d) to Y (n, m), keeping softmax(X X^T)");
  cmd->add_option("--x", args.x, "X, (n, d) .npy, float32 or float64")->required();
  cmd->add_option("--out", args.out, "output Y, (n, m) float32 .npy")->required();
  cmd->add_option("--method", args.method, "gaussian, srht, countsketch, svd or bss (default gaussian)")
      ->check(CLI::IsMember({"gaussian", "srht", "countsketch", "svd", "bss"}));
  cmd->add_option("--m", args.m,
                  "target dimension, 1 <= m <= d (default: ceil(n ln(100 n)) for the sketches, "
                  "rank(X) for svd, 4 n for bss; at most d)")
      ->check(CLI::PositiveNumber);
  add_seed_option(cmd, args.seed, "the random sketches");
  add_json_flag(cmd, args.json, "the sizes and the error");
  return {cmd, [a] { return run_reduce(*a); }};
}

}  // namespace levattn::cli
