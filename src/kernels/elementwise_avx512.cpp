// The row operations compiled for avx512 (CMakeLists.txt sets this file's ISA flags).
#include "kernels/elementwise_impl.hpp"

namespace levattn::kernels {

const RowOps& row_ops_avx512() {
  static constexpr RowOps ops = make_row_ops<Avx512, Avx512D>(Isa::avx512);
  return ops;
}

}  // namespace levattn::kernels
