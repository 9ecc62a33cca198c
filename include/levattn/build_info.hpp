// levattn/build_info.hpp: what this build of the library runs on (for `levattn info`).
#pragma once
#include <string>

namespace levattn {

struct BuildInfo {
  std::string version;     ///< library version
  std::string blas;        ///< BLAS library and its configuration string
  std::string blas_core;   ///< CPU kernel set the BLAS selected at run time
  /// Instruction set levattn's kernels run on: "avx512", "avx2" or "baseline" (the CPU's best,
  /// or the one the environment variable LEVATTN_ISA forces).
  std::string isa;
  std::string cpu_isa;     ///< the best instruction set this CPU offers to the kernels
  bool bf16 = false;       ///< Precision::bfloat16 takes effect (bf16_products(), kernel.hpp)
  int threads = 1;         ///< OpenMP threads a parallel region uses by default
  bool mpi = false;        ///< levattn::distributed (distributed.hpp) was built with this library
  bool sanitizers = false; ///< built with ASan/UBSan
};

/// The library version ("0.1.0").
const char* version() noexcept;

/// What this build runs on. Throws Error(invalid_argument) if LEVATTN_ISA names an unknown
/// path or one the CPU lacks.
BuildInfo build_info();

/// The report `levattn info` prints: one "name: value" line per field.
std::string to_string(const BuildInfo& info);

}  // namespace levattn
