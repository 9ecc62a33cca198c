// levattn: command-line entry point. Exit codes: 0 success, 2 bad input or usage, 1 internal.
#include "cli/cli.hpp"

int main(int argc, char** argv) { return levattn::cli::run_command_line(argc, argv); }
