// The row operations compiled for baseline (CMakeLists.txt sets this file's ISA flags).
#include "kernels/elementwise_impl.hpp"

namespace levattn::kernels {

const RowOps& row_ops_baseline() {
  static constexpr RowOps ops = make_row_ops<Scalar, ScalarD>(Isa::baseline);
  return ops;
}

}  // namespace levattn::kernels
