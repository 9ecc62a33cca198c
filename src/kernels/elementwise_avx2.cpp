// The row operations compiled for avx2 (CMakeLists.txt sets this file's ISA flags).
#include "kernels/elementwise_impl.hpp"

namespace levattn::kernels {

const RowOps& row_ops_avx2() {
  static constexpr RowOps ops = make_row_ops<Avx2, Avx2D>(Isa::avx2);
  return ops;
}

}  // namespace levattn::kernels
