#include "levattn/build_info.hpp"

#include <cblas.h>
#include <omp.h>

#include "kernels/isa.hpp"

namespace levattn {

const char* version() noexcept { return LEVATTN_VERSION; }

BuildInfo build_info() {
  BuildInfo b;
  b.version = LEVATTN_VERSION;
  b.blas = openblas_get_config();
  b.blas_core = openblas_get_corename();
  b.cpu_isa = kernels::to_string(kernels::cpu_isa());
  b.isa = kernels::to_string(kernels::active_isa());
  b.threads = omp_get_max_threads();
#if defined(__SANITIZE_ADDRESS__)
  b.sanitizers = true;
#endif
  return b;
}

}  // namespace levattn
