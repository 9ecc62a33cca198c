#include "levattn/build_info.hpp"

#include <cblas.h>
#include <omp.h>

namespace levattn {

BuildInfo build_info() {
  BuildInfo b;
  b.version = LEVATTN_VERSION;
  b.blas = openblas_get_config();
  b.blas_core = openblas_get_corename();
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  b.isa = __builtin_cpu_supports("avx512f") ? "avx512f"
          : __builtin_cpu_supports("avx2")  ? "avx2"
                                            : "x86-64";
#else
  b.isa = "generic";
#endif
  b.threads = omp_get_max_threads();
#if defined(__SANITIZE_ADDRESS__)
  b.sanitizers = true;
#endif
  return b;
}

}  // namespace levattn
