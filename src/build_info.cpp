#include "levattn/build_info.hpp"

#include <cblas.h>
#include <omp.h>

#include "kernels/isa.hpp"
#include "levattn/kernel.hpp"

#if defined(LEVATTN_MPI)
#define LEVATTN_MPI_TEXT LEVATTN_MPI
#else
#define LEVATTN_MPI_TEXT ""
#endif

namespace levattn {

const char* version() noexcept { return LEVATTN_VERSION; }

BuildInfo build_info() {
  BuildInfo b;
  b.version = LEVATTN_VERSION;
  b.blas = openblas_get_config();
  b.blas_core = openblas_get_corename();
  b.cpu_isa = kernels::to_string(kernels::cpu_isa());
  b.isa = kernels::to_string(kernels::active_isa());
  b.bf16 = bf16_products();
  b.threads = omp_get_max_threads();
#if defined(__SANITIZE_ADDRESS__)
  b.sanitizers = true;
#endif
#if defined(LEVATTN_MPI)
  b.mpi = true;
#endif
  return b;
}

std::string to_string(const BuildInfo& b) {
  return "levattn " + b.version + "\n" +                       //
         "BLAS:      " + b.blas + "\n" +                         //
         "BLAS core: " + b.blas_core + "\n" +                    //
         "ISA:       " + b.isa + " (CPU: " + b.cpu_isa + "; LEVATTN_ISA=avx512|avx2|baseline forces a path)\n" +
         "bfloat16:  " + (b.bf16 ? "products (AVX512_BF16)" : "not here: precision:bf16 runs in float32") + "\n" +
         "threads:   " + std::to_string(b.threads) + "\n" +      //
         "MPI:       " + (b.mpi ? "levattn::distributed built (" LEVATTN_MPI_TEXT ")" : "not built") + "\n";
}

}  // namespace levattn
