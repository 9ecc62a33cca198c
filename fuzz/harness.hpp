// fuzz/harness.hpp: what the fuzz harnesses share. Each harness defines LLVMFuzzerTestOneInput
// (libFuzzer's entry point); under clang's -fsanitize=fuzzer libFuzzer drives it, and in every
// other build fuzz/replay_main.cpp runs it over the files of the seed corpus and of the
// regressions (fuzz/corpus/<harness>/, fuzz/regressions/<harness>/).
//
// A finding is anything other than a result or a levattn::Error of kind invalid_argument or io
// whose message names what it rejects: a crash, a sanitizer report, another exception, an
// internal error, or a result that disagrees with its oracle. Each ends in harness_failure(),
// which prints the reason and aborts, so that libFuzzer saves the input.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <string_view>

#include "levattn/error.hpp"
#include "levattn/io.hpp"

namespace levattn::fuzz {

[[noreturn]] inline void harness_failure(const std::string& why) {
  std::fprintf(stderr, "levattn fuzz harness: %s\n", why.c_str());
  std::fflush(stderr);
  std::abort();
}

#define LEVATTN_FUZZ_CHECK(cond, why)                        \
  do {                                                       \
    if (!(cond)) ::levattn::fuzz::harness_failure(why);      \
  } while (false)

/// This process's scratch directory: a new directory under /dev/shm (memory, so that writing an
/// input costs no disk) or else the temporary directory, removed when the process exits.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const std::filesystem::path base =
        std::filesystem::is_directory("/dev/shm") ? std::filesystem::path("/dev/shm") : std::filesystem::temp_directory_path();
    std::string name = (base / "levattn-fuzz-XXXXXX").string();
    if (!mkdtemp(name.data())) harness_failure("cannot create a scratch directory under " + base.string());
    static const std::string made = name;
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(made, ec);
    });
    return std::filesystem::path(name);
  }();
  return dir;
}

/// Writes `bytes` to the scratch file `name` (replacing it) and returns its path.
inline std::filesystem::path write_scratch(const std::string& name, std::span<const std::uint8_t> bytes) {
  const std::filesystem::path path = scratch_dir() / name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) harness_failure("cannot write the scratch file " + path.string());
  return path;
}

/// Checks a rejection: a levattn::Error of kind invalid_argument or io (never internal: that is
/// a bug) whose message names `where` (the file or text it concerns) when `where` is non-empty.
inline void expect_rejection(const Error& e, std::string_view where) {
  LEVATTN_FUZZ_CHECK(e.kind() != ErrorKind::internal, std::string("internal error: ") + e.what());
  const std::string message = e.what();
  LEVATTN_FUZZ_CHECK(!e.detail().empty(), "an error without a detail: '" + message + "'");
  LEVATTN_FUZZ_CHECK(where.empty() || message.find(where) != std::string::npos,
                     "an error that does not name " + std::string(where) + ": '" + message + "'");
}

/// Runs f(); returns true when it returned, false when it threw an accepted rejection (see
/// expect_rejection). Any other exception is a finding.
template <class F>
bool accepted(F&& f, std::string_view where) {
  try {
    f();
    return true;
  } catch (const Error& e) {
    expect_rejection(e, where);
    return false;
  } catch (const std::exception& e) {
    harness_failure(std::string("an exception other than levattn::Error: ") + e.what());
  }
}

template <class T>
bool same_values(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// Whether two arrays have the same dtype, shape and value bits (NaN payloads included).
inline bool same_bits(const Array& a, const Array& b) {
  return a.dtype == b.dtype && a.shape == b.shape && same_values(a.f32, b.f32) && same_values(a.f64, b.f64) &&
         same_values(a.i64, b.i64);
}

}  // namespace levattn::fuzz
