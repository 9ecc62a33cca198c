// cli/cli.hpp: the levattn command, a thin layer over the library: argument parsing, files,
// printing. Every computation is a library call.
#pragma once
#include <chrono>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "levattn/levattn.hpp"

namespace levattn::cli {

using json = nlohmann::ordered_json;

/// The score-method flags shared by universal, heavy and attend.
struct MethodArgs {
  std::string method = "exact", sketch = "countsketch";
  index_t sketch_size = 0;
};
/// Adds --method, --sketch, --sketch-size to a subcommand.
void add_method_options(CLI::App* sub, MethodArgs& m);
/// LeverageOptions for those flags and a seed.
LeverageOptions leverage_options(const MethodArgs& m, std::uint64_t seed);

/// A float32 array read from a .npy file, with the file it came from.
struct Input {
  std::filesystem::path path;
  std::vector<index_t> shape;
  std::vector<float> values;
};

/// Reads a float32/float64 .npy with 2 to `max_dims` dimensions; `what` names the argument.
Input load_input(const std::filesystem::path& path, const std::string& what, int max_dims);

/// (batch, heads, rows, cols) view of a 2-D, 3-D or 4-D input.
Tensor4Ref as_tensor(const Input& in);

/// Rewrites a library message "keys: ..." as "keys (K.npy): ..." for the named inputs.
std::string annotate(const std::string& message, const std::vector<const Input*>& inputs,
                     const std::vector<std::string>& names);

/// Progress on stderr, only when stderr is a terminal and the work has run for 2 s.
class Progress {
 public:
  explicit Progress(std::string label);
  ~Progress();
  void operator()(double fraction);

 private:
  std::string label_;
  std::chrono::steady_clock::time_point start_;
  bool tty_ = false, shown_ = false;
  int last_percent_ = -1;
};

struct UniversalArgs {
  std::string keys, out;
  double eps = 0, ridge = 0, p = 2.0;
  index_t top_k = 0;
  bool use_top_k = false;  // --top-k given (selects top-k whatever its value)
  std::uint64_t seed = 0;
  MethodArgs method;
  bool json = false;
};
struct HeavyArgs {
  std::string queries, keys, out, normaliser = "exact";
  double eps = 0, p = 2.0, gamma = 0.1;
  index_t samples = 0;
  std::uint64_t seed = 0;
  MethodArgs method;
  bool json = false;
};
struct AttendArgs {
  std::string queries, keys, values, out, kernel = "softmax", select = "full";
  double p = 2.0, scale = 0, eps = 0;
  bool has_scale = false;
  index_t top_k = 0, window = -1, sinks = 0;
  std::string budget;  // "alpha,C"
  std::uint64_t seed = 0;
  MethodArgs method;
  bool json = false;
};
struct PlantedArgs {
  index_t n = 0, d = 0, relevant = 8;
  std::uint64_t seed = 0;
  std::string out_dir;
};
struct BenchArgs {
  index_t n = 16384, d = 64, heads = 1, top_k = 256;
  int repeats = 5;
  std::uint64_t seed = 0;
  bool json = false;
};
struct DemoArgs {
  index_t n = 16384, d = 64, relevant = 8, top_k = 256;
  double eps = 0.1;
  std::uint64_t seed = 0;
  bool json = false;
};

int run_info(bool as_json);
int run_universal(const UniversalArgs& a);
int run_heavy(const HeavyArgs& a);
int run_attend(const AttendArgs& a);
int run_planted(const PlantedArgs& a);
int run_bench(const BenchArgs& a);
int run_demo(const DemoArgs& a);

}  // namespace levattn::cli

#include "cli/timing.hpp"
