// levattn/build_info.hpp: what this build of the library runs on (for `levattn info`).
#pragma once
#include <string>

namespace levattn {

struct BuildInfo {
  std::string version;     ///< library version
  std::string blas;        ///< BLAS library and its configuration string
  std::string blas_core;   ///< CPU kernel set the BLAS selected at run time
  std::string isa;         ///< best vector ISA the CPU offers to levattn's kernels
  int threads = 1;         ///< OpenMP threads a parallel region uses by default
  bool mpi = false;        ///< built with MPI support
  bool sanitizers = false; ///< built with ASan/UBSan
};

BuildInfo build_info();

}  // namespace levattn
