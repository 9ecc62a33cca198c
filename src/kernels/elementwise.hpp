// kernels/elementwise.hpp: the vectorised row operations of the attention kernels, compiled once
// per instruction set (AVX-512, AVX2+FMA, portable baseline) and chosen at run time (isa.hpp).
// Every path computes the same formulas; they differ only in the order of the sums.
#pragma once
#include "kernels/isa.hpp"
#include "levattn/matrix.hpp"

namespace levattn::kernels {

/// The row operations of one instruction set.
struct RowOps {
  Isa isa = Isa::baseline;
  /// max_j x[j] over x[0 .. n); -inf for n == 0.
  float (*row_max)(const float* x, index_t n) = nullptr;
  /// x[j] <- exp(x[j] - shift) (0 where x[j] - shift < -87, -inf masks included), returns the sum.
  /// For x[j] <= shift (finite), the relative error of each exp is below 2e-7.
  float (*exp_shift_sum)(float* x, index_t n, float shift) = nullptr;
  /// x[j] <- |x[j]| (masked entries, marked -inf, become -1), returns the maximum (-1 if all masked).
  float (*abs_row_max)(float* x, index_t n) = nullptr;
  /// x[j] <- (x[j] / m)^p for x[j] >= 0 and 0 for the -1 mask, returns the sum. m > 0, p > 0.
  float (*power_rel_sum)(float* x, index_t n, float m, float p) = nullptr;
};

/// The operations of `isa`. Throws Error(invalid_argument) if this build or CPU lacks it.
const RowOps& row_ops(Isa isa);

/// The operations of active_isa() (LEVATTN_ISA, else the best the CPU has).
const RowOps& active_row_ops();

// One table per instruction set, each defined in its own translation unit (elementwise_*.cpp).
const RowOps& row_ops_baseline();
#if LEVATTN_X86_KERNELS
const RowOps& row_ops_avx2();
const RowOps& row_ops_avx512();
#endif

}  // namespace levattn::kernels
