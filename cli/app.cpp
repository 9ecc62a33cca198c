// The levattn command line: the subcommands' parser, and each failure mapped to a message and an
// exit code (cli.hpp: run_command_line).
#include <CLI/CLI.hpp>

#include <iostream>
#include <new>

#include "cli/cli.hpp"

namespace levattn::cli {
namespace {

int usage_error(const std::string& msg) {
  std::cerr << "levattn: " << msg << "\n";
  return 2;
}

}  // namespace

CommandLine::CommandLine()
    : app("levattn: heavy entries and attention over leverage-score universal sets of keys") {
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(levattn::version()));
  commands = {add_info(app),     add_universal(app), add_heavy(app),  add_attend(app), add_evaluate(app),
              add_reduce(app),   add_planted(app),   add_stream(app), add_bench(app),  add_demo(app)};
}

const Command* CommandLine::parse(int argc, char** argv, int& exit_code) {
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const Command& c : commands) {
      names += (names.empty() ? "" : ", ") + c.app->get_name();
      known = known || c.app->get_name() == argv[1];
    }
    if (!known) {
      exit_code = usage_error(std::string("unknown subcommand '") + argv[1] + "' (expected one of " + names + ")");
      return nullptr;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) {  // --help, --version
      exit_code = app.exit(e);
      return nullptr;
    }
    const auto chosen = app.get_subcommands();
    exit_code = usage_error(std::string(e.what()) + " (see levattn " +
                            (chosen.empty() ? std::string("--help") : chosen[0]->get_name() + " --help") + ")");
    return nullptr;
  }
  for (const Command& c : commands)
    if (c.app->parsed()) return &c;
  exit_code = usage_error("no subcommand given (see levattn --help)");
  return nullptr;
}

int run_guarded(const Command& command) {
  try {
    return command.run();
  } catch (const Error& e) {
    std::cerr << "levattn: " << e.what() << "\n";
    return exit_code_of(e.kind());
  } catch (const std::bad_alloc&) {  // an allocation no array name was given for: a workspace
    std::cerr << "levattn: out of memory: a working buffer could not be allocated (the address-space limit, ulimit "
                 "-v, or the machine's memory; smaller inputs need less)\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "levattn: internal error: " << e.what() << "\n";
    return 1;
  }
}

int run_command_line(int argc, char** argv) {
  CommandLine line;
  int exit_code = 0;
  const Command* command = line.parse(argc, argv, exit_code);
  return command ? run_guarded(*command) : exit_code;
}

}  // namespace levattn::cli
