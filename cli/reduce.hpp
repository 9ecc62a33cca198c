// cli/reduce.hpp: the `levattn reduce` command (feature-dimension reduction, reduce.hpp).
// main.cpp registers it with add_reduce_command and runs it with run_reduce.
#pragma once
#include <cstdint>
#include <string>

#include "levattn/matrix.hpp"

namespace CLI {
class App;
}

namespace levattn::cli {

struct ReduceArgs {
  std::string x, out, method = "gaussian";
  index_t m = 0;  // 0: the method's default
  std::uint64_t seed = 0;
  bool json = false;
};

/// Adds the `reduce` subcommand with its options (bound to `args`) to `app`; returns it.
CLI::App* add_reduce_command(CLI::App& app, ReduceArgs& args);

/// Reads X, reduces it, writes Y (float32 .npy, atomically) and prints the summary. Throws
/// levattn::Error on bad input (messages about X name its file).
int run_reduce(const ReduceArgs& args);

}  // namespace levattn::cli
