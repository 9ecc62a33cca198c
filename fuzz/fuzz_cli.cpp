// Fuzz harness of the levattn command line: the input is its arguments, one per line. They run
// as `levattn ARGS` would (cli::CommandLine, cli::run_guarded) in a scratch directory holding small
// input files (q.npy, k.npy, v.npy, k3.npy, x.npy, i.npy, nan.npy, bad.npy, qkv.npz, state.npz,
// state_v.npz; see make_fixtures), so that every command gets as far as its inputs allow.
//
// Every run must end with exit code 0, or 2 and a "levattn: <message>" on stderr; 1 (an internal
// error) is a finding. A run that fails must leave the directory as it found it: no new file, no
// temporary, every existing file unchanged. A run that succeeds leaves no temporary file.
//
// The inputs stay in the scratch directory: an argument holding '/' or equal to ".." is skipped.
// bench and demo are parsed only (their runs time fixed large products); planted runs only with
// arguments of at most two characters wherever a digit appears, so that its sizes stay below 100.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <iostream>
#include <map>
#include <sstream>
#include <vector>

#include "cli/cli.hpp"
#include "fuzz/harness.hpp"

namespace {

namespace fs = std::filesystem;
namespace fz = levattn::fuzz;
using levattn::Array;
using levattn::index_t;

constexpr std::size_t kMaxArguments = 24, kMaxArgumentBytes = 200;

Array small_matrix(index_t rows, index_t cols, int seed) {
  std::vector<float> v(static_cast<std::size_t>(rows * cols));
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(static_cast<int>((i * 7 + seed) % 5) - 2);
  return Array::from_float32({rows, cols}, std::move(v));
}

// The files every run starts with, by name: written once, read back as bytes.
const std::map<std::string, std::string>& fixtures() {
  static const std::map<std::string, std::string> files = [] {
    const fs::path dir = fz::scratch_dir() / "fixtures";
    fs::create_directories(dir);
    const Array q = small_matrix(6, 3, 0), k = small_matrix(6, 3, 1), v = small_matrix(6, 3, 2);
    levattn::write_npy(dir / "q.npy", q);
    levattn::write_npy(dir / "k.npy", k);
    levattn::write_npy(dir / "v.npy", v);
    std::vector<float> stack = k.f32;
    stack.insert(stack.end(), q.f32.begin(), q.f32.end());
    levattn::write_npy(dir / "k3.npy", Array::from_float32({2, 6, 3}, stack));
    std::vector<double> x(40);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<double>(i % 9) * 0.25 - 1.0;
    levattn::write_npy(dir / "x.npy", Array::from_float64({8, 5}, x));
    levattn::write_npy(dir / "i.npy", Array::from_int64({3}, {1, 2, 3}));
    Array nan = small_matrix(6, 3, 3);
    nan.f32[4] = std::numeric_limits<float>::quiet_NaN();
    levattn::write_npy(dir / "nan.npy", nan);
    levattn::write_text_file(dir / "bad.npy", "\x93NUMPY\x01\x00{'descr': '<f4'}");
    levattn::write_npz(dir / "qkv.npz", {{"q", q}, {"k", k}, {"v", v}});
    levattn::StreamingUniversalSet s(3, 0, 0.5), sv(3, 3, 0.5);
    s.push({k.f32.data(), 4, 3});
    sv.push({k.f32.data(), 4, 3}, {v.f32.data(), 4, 3});
    s.save(dir / "state.npz");
    sv.save(dir / "state_v.npz");
    std::map<std::string, std::string> out;
    for (const auto& e : fs::directory_iterator(dir)) {
      std::ifstream in(e.path(), std::ios::binary);
      out[e.path().filename().string()] = std::string(std::istreambuf_iterator<char>(in), {});
    }
    fs::remove_all(dir);
    return out;
  }();
  return files;
}

// What identifies a file's contents without reading them: a command writes a file by renaming a
// new one over it (a new inode) or in place (a new modification time).
struct Stamp {
  ino_t inode = 0;
  off_t size = 0;
  timespec modified{};
  bool operator==(const Stamp& o) const {
    return inode == o.inode && size == o.size && modified.tv_sec == o.modified.tv_sec &&
           modified.tv_nsec == o.modified.tv_nsec;
  }
};

Stamp stamp_of(const fs::path& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return {};
  return {st.st_ino, st.st_size, st.st_mtim};
}

// The scratch directory holding exactly the fixtures, and each fixture's stamp. Only what the
// last run added or changed is removed or written again.
fs::path reset_workdir(std::map<std::string, Stamp>& stamps) {
  const fs::path dir = fz::scratch_dir() / "work";
  fs::create_directories(dir);
  std::vector<fs::path> extra;
  for (const auto& e : fs::directory_iterator(dir))
    if (!fixtures().count(e.path().filename().string())) extra.push_back(e.path());
  for (const fs::path& p : extra) fs::remove_all(p);
  for (const auto& [name, bytes] : fixtures()) {
    const auto known = stamps.find(name);
    if (known != stamps.end() && stamp_of(dir / name) == known->second) continue;
    fz::write_scratch("work/" + name, {reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()});
    stamps[name] = stamp_of(dir / name);
  }
  return dir;
}

std::vector<std::string> split_arguments(const std::uint8_t* data, std::size_t size) {
  std::vector<std::string> args;
  std::string current;
  for (std::size_t i = 0; i < size; ++i) {
    if (data[i] == '\n') {
      args.push_back(std::move(current));
      current.clear();
    } else {
      current.push_back(static_cast<char>(data[i]));
    }
  }
  if (!current.empty()) args.push_back(std::move(current));
  return args;
}

bool stays_in_scratch(const std::vector<std::string>& args) {
  for (const std::string& a : args)
    if (a.find('/') != std::string::npos || a == ".." || a.size() > kMaxArgumentBytes || a.find('\0') != std::string::npos)
      return false;
  return args.size() <= kMaxArguments;
}

bool small_sizes(const std::vector<std::string>& args) {
  for (const std::string& a : args)
    if (a.size() > 2 && a.find_first_of("0123456789") != std::string::npos) return false;
  return true;
}

// Whether `name` is a temporary that write_file_atomically left: "<output>.tmp.<16 hex digits>",
// unless the arguments name it, as an output may be named anything.
bool leftover_temporary(const std::string& name, const std::vector<std::string>& args) {
  const std::size_t at = name.rfind(".tmp.");
  if (at == std::string::npos || name.size() != at + 5 + 16) return false;
  for (std::size_t i = at + 5; i < name.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(name[i])) && (name[i] < 'a' || name[i] > 'f')) return false;
  return std::find(args.begin(), args.end(), name) == args.end();
}

// Runs the command line in `dir` with stdout discarded and stderr captured.
int run_in(const fs::path& dir, std::vector<std::string> args, std::string& err) {
  args.insert(args.begin(), "levattn");
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const fs::path home = fs::current_path();
  fs::current_path(dir);
  std::ostringstream captured;
  std::streambuf* const old_err = std::cerr.rdbuf(captured.rdbuf());
  std::streambuf* const old_out = std::cout.rdbuf(nullptr);  // discarded (badbit set until restored)
  levattn::cli::CommandLine line;
  int code = 0;
  const levattn::cli::Command* command = line.parse(static_cast<int>(args.size()), argv.data(), code);
  const std::string name = command ? command->app->get_name() : "";
  const bool runs = command && name != "bench" && name != "demo" && (name != "planted" || small_sizes(args));
  if (runs) code = levattn::cli::run_guarded(*command);
  std::cout.rdbuf(old_out);
  std::cout.clear();
  std::cerr.rdbuf(old_err);
  fs::current_path(home);
  err = captured.str();
  return code;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // Commands that print with printf (evaluate's table) write to stdout: discarded, as std::cout.
  if (!std::freopen("/dev/null", "w", stdout)) fz::harness_failure("cannot discard stdout");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static std::map<std::string, Stamp> stamps;
  const std::vector<std::string> args = split_arguments(data, size);
  if (!stays_in_scratch(args)) return 0;
  const fs::path dir = reset_workdir(stamps);
  std::string err;
  const int code = run_in(dir, args, err);
  LEVATTN_FUZZ_CHECK(code == 0 || code == 2, "exit code " + std::to_string(code) + ": " + err);
  LEVATTN_FUZZ_CHECK(code == 0 || (err.rfind("levattn: ", 0) == 0 && err.size() > 10),
                     "exit code 2 without a message: '" + err + "'");
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    const std::string name = e.path().lexically_relative(dir).string();  // no system calls, unlike fs::relative
    LEVATTN_FUZZ_CHECK(!leftover_temporary(name, args), "a temporary file was left: " + name);
    if (code == 0) continue;
    LEVATTN_FUZZ_CHECK(fixtures().count(name) > 0, "a failed run left a new file: " + name + " (" + err + ")");
    LEVATTN_FUZZ_CHECK(stamp_of(e.path()) == stamps[name], "a failed run changed " + name + " (" + err + ")");
  }
  return 0;
}
