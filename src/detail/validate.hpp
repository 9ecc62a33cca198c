// detail/validate.hpp: argument checks shared by the public entry points.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>
#include <string>

#include "detail/require.hpp"
#include "levattn/matrix.hpp"

namespace levattn::kernels {
struct RowOps;
}

namespace levattn {
struct AttentionOptions;
struct KernelOptions;
struct LeverageOptions;
}  // namespace levattn

namespace levattn::detail {

/// Whether x[0 .. n) are all finite; branch-free so it vectorises.
inline bool all_finite(const float* x, index_t n) {
  std::uint32_t bad = 0;
  for (index_t j = 0; j < n; ++j)
    bad |= static_cast<std::uint32_t>((std::bit_cast<std::uint32_t>(x[j]) & 0x7f800000u) == 0x7f800000u);
  return bad == 0;
}

/// Throws unless the matrix is non-empty and every entry finite; `what` names the argument.
void require_finite_matrix(ConstMatrix A, const char* what);

/// require_finite_matrix(A, what), and in the same pass max_ij |a_ij|.
double finite_max_abs(ConstMatrix A, const char* what);

/// max |x_j| over x[0 .. n), or -1 if an entry is NaN or Inf: one pass of ops.max_abs (the
/// kernel of an instruction set, kernels/elementwise.hpp), no throw.
double max_abs_or_non_finite(const kernels::RowOps& ops, const float* x, index_t n);

/// x rounded down to an index, clamped to [0, 2^62] (NaN gives 0): a float-to-integer conversion
/// that is defined for every double.
index_t to_index(double x);

/// Throws unless v lies in the open interval (0, 1); `what` names the parameter.
void require_open_unit(double v, const char* what);

/// Throws unless eps is a number in (0, 1].
void require_eps(double eps, const char* what = "eps");

/// The option checks of attention() (kernel, window, sinks, eps, budgets per selection) and of
/// the leverage scores (ridge, rank_rtol), for entry points that reach them another way.
void check_attention_options(const AttentionOptions& o);
/// Throws Error(invalid_argument) unless the kernel's p (power) and scale (NaN or finite) are valid.
void check_kernel(const KernelOptions& o);
void check_leverage_options(const LeverageOptions& o);

}  // namespace levattn::detail
