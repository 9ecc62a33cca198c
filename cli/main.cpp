// levattn: command-line entry point. Exit codes: 0 success, 2 bad input or usage, 1 internal.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <new>

#include "cli/cli.hpp"
#include "cli/reduce.hpp"

namespace {

using namespace levattn;
using namespace levattn::cli;

int usage_error(const std::string& msg) {
  std::cerr << "levattn: " << msg << "\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"levattn: heavy entries and attention over leverage-score universal sets of keys"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(build_info().version));

  bool info_json = false;
  auto* info = app.add_subcommand("info", "print the version, BLAS, ISA and threads in use");
  info->add_flag("--json", info_json, "print one JSON object");

  UniversalArgs ua;
  auto* uni = app.add_subcommand("universal", "universal set of keys by leverage score");
  uni->add_option("--keys", ua.keys, "keys K, (n, d) .npy")->required();
  auto* ueps = uni->add_option("--eps", ua.eps, "threshold: every key j with tau_j >= eps");
  auto* utop = uni->add_option("--top-k", ua.top_k, "the N keys of largest score");
  ueps->excludes(utop);
  uni->add_option("--ridge", ua.ridge, "ridge lambda >= 0 (p = 2)");
  uni->add_option("--p", ua.p, "f(x) = |x|^p: scores are sensitivity bounds from Lewis weights (default 2: leverage)");
  uni->add_option("--seed", ua.seed, "seed of the sketch (default 0)");
  add_method_options(uni, ua.method);
  uni->add_flag("--json", ua.json, "print one JSON object");
  uni->add_option("--out", ua.out, "write the indices (int64 .npy)");

  HeavyArgs ha;
  auto* heavy = app.add_subcommand("heavy", "every eps-heavy entry of x^2 attention, exactly");
  heavy->add_option("--queries", ha.queries, "queries Q, (m, d) or (heads, m, d) .npy")->required();
  heavy->add_option("--keys", ha.keys, "keys K, (n, d) or (heads, n, d) .npy")->required();
  heavy->add_option("--eps", ha.eps, "report A_ij >= eps, eps in (0, 1]")->required();
  heavy->add_option("--out", ha.out, "H.csv or H.npz (default: CSV on stdout)");
  heavy->add_option("--p", ha.p, "f(x) = |x|^p (default 2)");
  heavy->add_option("--normaliser", ha.normaliser, "exact (default) or sampled row normalisers")
      ->check(CLI::IsMember({"exact", "sampled"}));
  heavy->add_option("--gamma", ha.gamma, "sampled: target accuracy in (0, 1) (default 0.1)");
  heavy->add_option("--samples", ha.samples, "sampled: keys to draw (default: from --gamma)");
  heavy->add_option("--seed", ha.seed, "seed of the sampled normalisers and of the sketch (default 0)");
  add_method_options(heavy, ha.method);
  heavy->add_flag("--json", ha.json, "print a JSON summary");

  AttendArgs aa;
  auto* attend = app.add_subcommand("attend", "attention over a selection of keys");
  attend->add_option("--queries", aa.queries, "Q .npy: (m, d), (h, m, d) or (b, h, m, d)")->required();
  attend->add_option("--keys", aa.keys, "K .npy, same layout, n keys")->required();
  attend->add_option("--values", aa.values, "V .npy, same layout, n values of width dv")->required();
  attend->add_option("--out", aa.out, "output O .npy (float32)")->required();
  attend->add_option("--kernel", aa.kernel, "softmax or poly (|x|^p)")
      ->check(CLI::IsMember({"softmax", "poly"}));
  attend->add_option("--p", aa.p, "exponent of the poly kernel, > 0");
  attend->add_option("--scale", aa.scale, "logit scale (default 1/sqrt(d) softmax, 1 poly)");
  attend->add_option("--select", aa.select, "full, leverage, topk, window or random")
      ->check(CLI::IsMember({"full", "leverage", "topk", "window", "random"}));
  attend->add_option("--top-k", aa.top_k, "budget of leverage, topk and random");
  attend->add_option("--eps", aa.eps, "leverage threshold in (0, 1]");
  attend->add_option("--window", aa.window, "also keys i-W .. i+W");
  attend->add_option("--sinks", aa.sinks, "also the first S keys");
  attend->add_option("--seed", aa.seed, "seed of random selection and of the sketch");
  add_method_options(attend, aa.method);
  attend->add_option("--budget", aa.budget, "adaptive budget alpha,C: top-k = ceil(alpha n^C)");
  attend->add_flag("--json", aa.json, "print selection sizes and timings as JSON");

  PlantedArgs pa;
  auto* plant = app.add_subcommand("planted", "write a planted instance Q.npy K.npy V.npy");
  plant->add_option("--n", pa.n, "keys and queries")->required();
  plant->add_option("--d", pa.d, "dimension")->required();
  plant->add_option("--relevant", pa.relevant, "planted keys (default 8)");
  plant->add_option("--seed", pa.seed, "seed (default 0)");
  plant->add_option("--out-dir", pa.out_dir, "directory to write into")->required();

  BenchArgs ba;
  auto* bench = app.add_subcommand("bench", "time LevAttention, dense attention and BLAS");
  bench->add_option("--n", ba.n, "context length (default 16384)");
  bench->add_option("--d", ba.d, "head dimension (default 64)");
  bench->add_option("--heads", ba.heads, "heads (default 1)");
  bench->add_option("--top-k", ba.top_k, "keys per head (default 256)");
  bench->add_option("--repeats", ba.repeats, "timed runs, the median is reported (default 5)");
  bench->add_option("--seed", ba.seed, "seed of the random inputs");
  bench->add_flag("--json", ba.json, "print one JSON object");

  DemoArgs da;
  auto* demo = app.add_subcommand("demo", "planted instance: universal set, heavy entries, LevAttention vs dense");
  demo->add_option("--n", da.n, "context length (default 16384)");
  demo->add_option("--d", da.d, "dimension (default 64)");
  demo->add_option("--top-k", da.top_k, "LevAttention keys (default 256)");
  demo->add_option("--eps", da.eps, "heavy-entry threshold (default 0.1)");
  demo->add_option("--seed", da.seed, "seed (default 0)");
  demo->add_flag("--json", da.json, "print one JSON object");

  ReduceArgs ra;
  auto* red = add_reduce_command(app, ra);

  if (argc > 1 && argv[1][0] != '-') {
    bool known = false;
    for (const auto* sub : app.get_subcommands({})) known = known || sub->get_name() == argv[1];
    if (!known)
      return usage_error(std::string("unknown subcommand '") + argv[1] +
                         "' (expected one of info, universal, heavy, attend, reduce, planted, bench, demo)");
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    return usage_error(std::string(e.what()) + " (see levattn " +
                       (app.get_subcommands().empty() ? std::string("--help")
                                                      : app.get_subcommands()[0]->get_name() + " --help") +
                       ")");
  }

  try {
    if (*info) return run_info(info_json);
    if (*uni) {
      if (ueps->count() == 0 && utop->count() == 0) return usage_error("universal: give --eps or --top-k");
      ua.use_top_k = utop->count() > 0;
      return run_universal(ua);
    }
    if (*heavy) return run_heavy(ha);
    if (*attend) {
      aa.has_scale = attend->get_option("--scale")->count() > 0;
      return run_attend(aa);
    }
    if (*plant) return run_planted(pa);
    if (*bench) return run_bench(ba);
    if (*demo) return run_demo(da);
    if (*red) return run_reduce(ra);
  } catch (const Error& e) {
    std::cerr << "levattn: " << e.what() << "\n";
    return e.kind() == ErrorKind::internal ? 1 : 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "levattn: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "levattn: internal error: " << e.what() << "\n";
    return 1;
  }
  return 1;
}
