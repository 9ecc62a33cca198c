// levattn: command-line entry point. Exit codes: 0 success, 2 bad input or usage, 1 internal.
#include <CLI/CLI.hpp>

#include <iostream>
#include <new>

#include "cli/cli.hpp"

namespace {

int usage_error(const std::string& msg) {
  std::cerr << "levattn: " << msg << "\n";
  return 2;
}

// Runs the chosen command, mapping every failure to a message and an exit code.
int run_guarded(const std::function<int()>& run) {
  using levattn::Error;
  try {
    return run();
  } catch (const Error& e) {
    std::cerr << "levattn: " << e.what() << "\n";
    return e.kind() == levattn::ErrorKind::internal ? 1 : 2;
  } catch (const std::bad_alloc&) {
    std::cerr << "levattn: out of memory\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "levattn: internal error: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  using namespace levattn::cli;
  CLI::App app{"levattn: heavy entries and attention over leverage-score universal sets of keys"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(levattn::version()));
  const std::vector<Command> commands = {add_info(app),    add_universal(app), add_heavy(app),
                                         add_attend(app),  add_evaluate(app),  add_reduce(app),    add_planted(app),
                                         add_stream(app),  add_bench(app),    add_demo(app)};
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const Command& c : commands) {
      names += (names.empty() ? "" : ", ") + c.app->get_name();
      known = known || c.app->get_name() == argv[1];
    }
    if (!known)
      return usage_error(std::string("unknown subcommand '") + argv[1] + "' (expected one of " + names + ")");
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    const auto chosen = app.get_subcommands();
    return usage_error(std::string(e.what()) + " (see levattn " +
                       (chosen.empty() ? std::string("--help") : chosen[0]->get_name() + " --help") + ")");
  }
  for (const Command& c : commands)
    if (c.app->parsed()) return run_guarded(c.run);
  return 1;
}
