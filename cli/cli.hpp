// cli/cli.hpp: the levattn command, a thin layer over the library: argument parsing, files,
// printing. Every computation is a library call.
#pragma once
#include <chrono>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "levattn/levattn.hpp"

namespace levattn::cli {

using json = nlohmann::ordered_json;

/// A subcommand: its parser and what runs it (the arguments live in the closure).
struct Command {
  CLI::App* app = nullptr;
  std::function<int()> run;
};

/// The parser of `levattn <subcommand> [options]`, every subcommand registered.
struct CommandLine {
  CLI::App app;
  std::vector<Command> commands;

  CommandLine();
  /// Parses argv: the chosen command, or nullptr with `exit_code` set where parsing ends the run
  /// (2: an unknown subcommand or a CLI11 parse error, printed as "levattn: <message>" on stderr;
  /// 0: --help or --version, printed).
  const Command* parse(int argc, char** argv, int& exit_code);
};

/// Runs a parsed command: its exit code, or each failure as "levattn: <message>" on stderr and
/// exit code 2 (an Error of kind invalid_argument or io) or 1 (internal, memory exhausted, any
/// other exception). Nothing leaves it.
int run_guarded(const Command& command);

/// The exit code of a failure: 2 for bad input (Error kinds invalid_argument and io), 1 for the
/// rest (memory exhausted, internal).
int exit_code_of(ErrorKind kind);

/// parse() then run_guarded(): what main() returns.
int run_command_line(int argc, char** argv);

Command add_info(CLI::App& app);
Command add_universal(CLI::App& app);
Command add_heavy(CLI::App& app);
Command add_attend(CLI::App& app);
Command add_evaluate(CLI::App& app);
Command add_reduce(CLI::App& app);
Command add_planted(CLI::App& app);
Command add_bench(CLI::App& app);
Command add_demo(CLI::App& app);
Command add_stream(CLI::App& app);

// ---------------------------------------------------------------------------------------------
// Shared options and inputs (inputs.cpp).

/// The score-method flags shared by universal, heavy and attend.
struct MethodArgs {
  std::string method = "exact", sketch = "countsketch";
  index_t sketch_size = 0;
};
/// Adds --method, --sketch, --sketch-size to a subcommand.
void add_method_options(CLI::App* sub, MethodArgs& m);
/// Adds --seed (an integer in [0, 2^63)) to a subcommand.
void add_seed_option(CLI::App* sub, std::int64_t& seed, const std::string& what);
/// LeverageOptions for those flags and a seed.
LeverageOptions leverage_options(const MethodArgs& m, std::int64_t seed);

/// The options levattn and levattn-mpi share, each declared here once (name, help, check):
/// --queries, --keys, --values (the files of Q, K, V; null: the command takes none), --select
/// (the selection spec; `which`: what this program runs of it, put before the spec's help),
/// --eps of universal and heavy, --json (`what` it prints).
void add_qkv_file_options(CLI::App* sub, std::string* queries, std::string* keys, std::string* values);
CLI::Option* add_select_option(CLI::App* sub, std::string& spec, const std::string& which = "");
CLI::Option* add_universal_eps_option(CLI::App* sub, double& eps);
CLI::Option* add_heavy_eps_option(CLI::App* sub, double& eps);
CLI::Option* add_json_flag(CLI::App* sub, bool& as_json, const std::string& what);

/// --scale of an attend command: registered by add(), checked (finite) and put into the options
/// by apply() when it was given.
struct ScaleOption {
  double value = 0.0;
  CLI::Option* option = nullptr;
  void add(CLI::App* sub);
  /// options.scale <- the given --scale; Error(invalid_argument) naming it unless finite.
  void apply(AttentionOptions& options) const;
};
/// Registers on an attend command, hidden, the options that named parts of a selection before
/// --select took the whole spec (--top-k, --eps, --window, --sinks, --kernel, --p, ...); returns
/// the check to run after parsing, which throws Error(invalid_argument) naming the one given and
/// its spelling in the spec.
std::function<void()> retire_selection_options(CLI::App* sub);

/// A float32 array read from a .npy file or an .npz member, with where it came from.
struct Input {
  std::string source;  ///< "K.npy", or "qkv.npz: member 'k'"
  std::vector<index_t> shape;
  std::vector<float> values;
};

/// Reads a float32/float64 array with 2 to `max_dims` dimensions from a .npy file; `what` names
/// the argument.
Input load_input(const std::filesystem::path& path, const std::string& what, int max_dims);

/// The arrays `names` (for example {"q", "k", "v"}) of an .npz archive, each as load_input.
std::vector<Input> load_members(const std::filesystem::path& npz, const std::vector<std::string>& names,
                                const std::vector<std::string>& what, int max_dims);

/// (batch, heads, rows, cols) view of a 2-D, 3-D or 4-D input.
Tensor4Ref as_tensor(const Input& in);

/// Throws Error(invalid_argument) unless every input has the same leading (batch, heads)
/// dimensions and number of dimensions as the first.
void require_same_stack(const std::vector<const Input*>& inputs, const std::vector<std::string>& names);

/// Runs f; a library Error about one of the named arguments ("keys: ...") gets that input's
/// source: "keys (K.npy): ...".
template <class F>
auto with_sources(const std::vector<const Input*>& inputs, const std::vector<std::string>& names, F&& f) {
  try {
    return f();
  } catch (const Error& e) {
    const std::string field = e.field();
    for (std::size_t i = 0; i < inputs.size(); ++i)
      if (field == names[i]) throw Error(e.kind(), names[i] + " (" + inputs[i]->source + ")", e.detail());
    throw;
  }
}

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

/// v printed with a printf format.
std::string format_value(double v, const char* fmt = "%.9g");
/// Seconds since t0.
double seconds_since(std::chrono::steady_clock::time_point t0);

/// Whether a path names an .npz archive (by its suffix).
bool is_npz(const std::string& path);

// ---------------------------------------------------------------------------------------------
// Output files (outputs.cpp).

/// One universal set as JSON: rank, size, bound, ties_left_out, indices, scores.
json set_json(const UniversalSet& u);
/// Universal sets to `out`: an int64 .npy of the indices (one set), or an .npz with indices,
/// offsets (one set per (batch, head) pair) and scores. A stack to a .npy is refused.
void write_sets(const std::string& out, const std::vector<UniversalSet>& sets, bool stacked);
/// Heavy entries of every (batch, head) pair as CSV (to `out`, or stdout) or .npz members, with
/// the leading columns the input has ("head", "batch" for 3-D / 4-D inputs, `dims`).
void write_heavy(const std::string& out, const std::vector<HeavyEntries>& per, index_t heads, std::size_t dims,
                 bool to_stdout);

/// A note on stderr when a key budget exceeds the keys there are (the library then takes every
/// key).
void note_budget(const char* command, index_t top_k, index_t n);

}  // namespace levattn::cli

#include "cli/timing.hpp"
