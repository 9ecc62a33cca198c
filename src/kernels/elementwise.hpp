// kernels/elementwise.hpp: the vectorised row operations of the attention kernels. Each is
// compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (target_clones), so the
// library runs on any x86-64 CPU.
#pragma once
#include "levattn/matrix.hpp"

namespace levattn::kernels {

/// max_j x[j]; -inf for n == 0.
float row_max(const float* x, index_t n);

/// x[j] <- exp(x[j] - shift) (0 where x[j] == -inf), returns sum_j x[j]. shift is finite.
/// Relative error of each exp below 2e-7.
float exp_shift_sum(float* x, index_t n, float shift);

/// x[j] <- |x[j]| (masked entries, marked -inf, become -1), returns the maximum (-1 if all masked).
float abs_row_max(float* x, index_t n);

/// x[j] <- (x[j] / m)^p for x[j] >= 0 and 0 for the -1 mask, returns the sum. m > 0.
float power_rel_sum(float* x, index_t n, float m, float p);

}  // namespace levattn::kernels
