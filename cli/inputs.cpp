// Shared pieces of the commands: options, input files, progress.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "cli/cli.hpp"

namespace levattn::cli {

int exit_code_of(ErrorKind kind) { return kind == ErrorKind::invalid_argument || kind == ErrorKind::io ? 2 : 1; }

std::string format_value(double v, const char* fmt) {
  char buf[32];
  std::snprintf(buf, sizeof buf, fmt, v);
  return buf;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void add_method_options(CLI::App* sub, MethodArgs& m) {
  sub->add_option("--method", m.method, "leverage scores: exact (default) or sketch")
      ->check(CLI::IsMember({"exact", "sketch"}));
  sub->add_option("--sketch", m.sketch, "sketch: countsketch (default), srht or gaussian")
      ->check(CLI::IsMember({"countsketch", "srht", "gaussian"}));
  sub->add_option("--sketch-size", m.sketch_size,
                  "sketch: rows of the sketch, at least d (default: for gamma 0.2)");
}

void add_seed_option(CLI::App* sub, std::int64_t& seed, const std::string& what) {
  sub->add_option("--seed", seed, "seed of " + what + ", an integer in [0, 2^63) (default 0)")
      ->check(CLI::NonNegativeNumber);
}


namespace {
// The help of --select: the selection spec of parse_selection (options.hpp).
const char* const kSelectHelp =
    "the selection, one spec NAME[:K][+FIELD:VALUE...] (default full): full, leverage:K or leverage+eps:E, topk:K, "
    "random:K, window:W, cluster:K; fields top_k, eps, window, sinks, probe, clusters, iterations, seed, residual "
    "(R keys per block of 256 queries sampled from the rest, weighted: an unbiased estimate of what the selection "
    "drops), kernel "
    "(softmax | poly), p, budget_alpha, budget_exponent, method (exact | sketch), ridge, rank_rtol, sketch, "
    "sketch_size, gamma, jl_columns, delta, sketch_seed; e.g. leverage:32+window:4+sinks:2, cluster:32+probe:8, "
    "leverage+eps:0.05+kernel:poly+p:4, leverage:128+residual:128";
}  // namespace

void add_qkv_file_options(CLI::App* sub, std::string* queries, std::string* keys, std::string* values) {
  if (queries) sub->add_option("--queries", *queries, "queries Q .npy: (m, d), (h, m, d) or (b, h, m, d)");
  if (keys) sub->add_option("--keys", *keys, "keys K .npy: (n, d), (h, n, d) or (b, h, n, d)");
  if (values) sub->add_option("--values", *values, "values V .npy: (n, dv), (h, n, dv) or (b, h, n, dv), one row per key");
}

CLI::Option* add_select_option(CLI::App* sub, std::string& spec, const std::string& which) {
  return sub->add_option("--select", spec, which.empty() ? std::string(kSelectHelp) : which + "; " + kSelectHelp);
}

CLI::Option* add_universal_eps_option(CLI::App* sub, double& eps) {
  return sub->add_option("--eps", eps, "threshold: every key j with score >= eps, eps in (0, 1]");
}

CLI::Option* add_heavy_eps_option(CLI::App* sub, double& eps) {
  return sub->add_option("--eps", eps, "report every entry A_ij >= eps, eps in (0, 1]")->required();
}

CLI::Option* add_json_flag(CLI::App* sub, bool& as_json, const std::string& what) {
  return sub->add_flag("--json", as_json, "print " + what + " as JSON");
}

void ScaleOption::add(CLI::App* sub) {
  option = sub->add_option("--scale", value,
                           "logit scale, any finite number (default 1/sqrt(d) softmax, 1 poly); 0 weighs every "
                           "selected key equally, a negative scale reverses the order of the logits");
}

void ScaleOption::apply(AttentionOptions& options) const {
  if (!option || option->count() == 0) return;
  if (!std::isfinite(value))
    throw Error(ErrorKind::invalid_argument, "scale", "expected a finite number, got " + format_value(value));
  options.scale = value;
}

std::function<void()> retire_selection_options(CLI::App* sub) {
  static const std::pair<const char*, const char*> kRetired[] = {
      {"--top-k", "NAME:K (leverage:32, topk:8, random:32, cluster:32)"},
      {"--eps", "leverage+eps:E"},
      {"--window", "window:W, or NAME:K+window:W"},
      {"--sinks", "+sinks:S"},
      {"--clusters", "cluster:K+clusters:C"},
      {"--probe", "cluster:K+probe:P"},
      {"--cluster-iterations", "cluster:K+iterations:I"},
      {"--kernel", "+kernel:poly"},
      {"--p", "+kernel:poly+p:P"},
      {"--seed", "+seed:S (random, cluster) or +sketch_seed:S (a sketch)"},
      {"--budget", "+budget_alpha:A+budget_exponent:C"},
      {"--method", "+method:sketch"},
      {"--sketch", "+sketch:KIND"},
      {"--sketch-size", "+sketch_size:S"},
  };
  std::vector<std::pair<CLI::Option*, std::pair<const char*, const char*>>> given;
  for (const auto& r : kRetired) given.emplace_back(sub->add_option(r.first)->group(""), r);
  return [given] {
    for (const auto& [opt, r] : given)
      if (opt->count() > 0)
        throw Error(ErrorKind::invalid_argument, r.first,
                    std::string("the selection is one spec, --select ") + r.second +
                        "; for example --select leverage:32+window:4+sinks:2");
  };
}

LeverageOptions leverage_options(const MethodArgs& m, std::int64_t seed) {
  LeverageOptions o;
  o.method = parse_score_method(m.method);
  o.sketch = parse_sketch_kind(m.sketch);
  o.sketch_size = m.sketch_size;
  o.seed = static_cast<std::uint64_t>(seed);
  return o;
}

namespace {

Input make_input(Array a, const std::string& source, const std::string& what, int max_dims) {
  const auto dims = static_cast<int>(a.shape.size());
  if (dims < 2 || dims > max_dims) {
    const char* allowed = max_dims >= 4 ? "2-D, 3-D or 4-D" : max_dims == 3 ? "2-D or 3-D" : "2-D";
    throw Error(ErrorKind::invalid_argument, source,
                what + ": expected a " + allowed + " array, got " + std::to_string(dims) + "-D");
  }
  for (index_t extent : a.shape)
    if (extent < 1)
      throw Error(ErrorKind::invalid_argument, source, what + ": expected a non-empty array, got a dimension of 0");
  Input in;
  in.source = source;
  in.shape = a.shape;
  try {  // float32 moves in: one copy of the data in memory, not two
    in.values = a.dtype == DType::float32 ? std::move(a.f32) : to_float32(a, what);
  } catch (const Error& e) {
    throw Error(e.kind(), source, e.what());
  } catch (const std::bad_alloc&) {
    allocation_failed(static_cast<double>(a.size()) * sizeof(float), source, what + " as float32");
  }
  return in;
}

}  // namespace

Input load_input(const std::filesystem::path& path, const std::string& what, int max_dims) {
  return make_input(read_npy(path), path.string(), what, max_dims);
}

std::vector<Input> load_members(const std::filesystem::path& npz, const std::vector<std::string>& names,
                                const std::vector<std::string>& what, int max_dims) {
  auto arrays = read_npz(npz);
  std::vector<Input> out;
  for (std::size_t i = 0; i < names.size(); ++i) {
    auto it = std::find_if(arrays.begin(), arrays.end(), [&](const auto& a) { return a.first == names[i]; });
    if (it == arrays.end()) {
      std::string have;
      for (const auto& a : arrays) have += (have.empty() ? "'" : ", '") + a.first + "'";
      throw Error(ErrorKind::invalid_argument, npz.string(),
                  "expected a member '" + names[i] + "' (" + what[i] + "), found " + (have.empty() ? "none" : have));
    }
    out.push_back(make_input(std::move(it->second), npz.string() + ": member '" + names[i] + "'", what[i], max_dims));
  }
  return out;
}

Tensor4Ref as_tensor(const Input& in) {
  Tensor4Ref t;
  t.data = in.values.data();
  const auto& s = in.shape;
  const std::size_t k = s.size();
  t.rows = s[k - 2];
  t.cols = s[k - 1];
  t.heads = k >= 3 ? s[k - 3] : 1;
  t.batch = k >= 4 ? s[k - 4] : 1;
  return t;
}

void require_same_stack(const std::vector<const Input*>& inputs, const std::vector<std::string>& names) {
  const Input& first = *inputs[0];
  for (std::size_t i = 1; i < inputs.size(); ++i) {
    const Input& in = *inputs[i];
    const bool same = in.shape.size() == first.shape.size() &&
                      std::equal(first.shape.begin(), first.shape.end() - 2, in.shape.begin());
    if (!same)
      throw Error(ErrorKind::invalid_argument, names[0] + " (" + first.source + "), " + names[i] + " (" + in.source + ")",
                  "expected the same number of dimensions and the same leading (batch, heads) dimensions");
  }
}

Progress::Progress(std::string label)
    : label_(std::move(label)), start_(std::chrono::steady_clock::now()), tty_(isatty(2) != 0) {}

Progress::~Progress() {
  if (shown_) std::fprintf(stderr, "\r%s: done      \n", label_.c_str());
}

void Progress::operator()(double fraction) {
  if (!tty_) return;
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  if (elapsed < 2.0) return;
  const int percent = static_cast<int>(std::clamp(fraction, 0.0, 1.0) * 100.0);
  if (percent == last_percent_) return;
  last_percent_ = percent;
  shown_ = true;
  std::fprintf(stderr, "\r%s: %3d%% (%.0f s)", label_.c_str(), percent, elapsed);
  std::fflush(stderr);
}

bool is_npz(const std::string& path) {
  return path.size() >= 4 && path.compare(path.size() - 4, 4, ".npz") == 0;
}

void note_budget(const char* command, index_t top_k, index_t n) {
  if (top_k > n)
    std::cerr << "levattn " << command << ": --top-k " << top_k << " is more than the " << n
              << " keys; every key is selected\n";
}

}  // namespace levattn::cli
