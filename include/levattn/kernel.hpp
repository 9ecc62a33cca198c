// levattn/kernel.hpp: the kernel of attention, f applied to the scaled logits, and its options:
// the ground floor that the row kernels and every attention path read.
#pragma once
#include <limits>
#include <string>

#include "levattn/matrix.hpp"

namespace levattn {

/// f applied to the scaled logits s = scale * q.k.
enum class Kernel {
  softmax,  ///< f(s) = exp(s), scale 1/sqrt(d) by default
  power,    ///< f(s) = |s|^p, scale 1 by default
};

/// The kernel of attention: what attention over a given selection reads (selected_attention.hpp).
struct KernelOptions {
  Kernel kernel = Kernel::softmax;
  double p = 2.0;  ///< exponent of the power kernel, > 0
  /// Logit scale; NaN means the default (1/sqrt(d) for softmax, 1 for power). Must be finite.
  double scale = std::numeric_limits<double>::quiet_NaN();
};

/// The logit scale a call uses: options.scale, or its kernel's default (1/sqrt(d) for softmax,
/// 1 for power) when that is NaN.
double logit_scale(const KernelOptions& options, index_t d);

/// The name used by the CLI and in messages: "softmax" or "poly".
std::string to_string(Kernel k);

/// The inverse of to_string ("power" is accepted for "poly"). Throws Error(invalid_argument)
/// naming the choices for any other name.
Kernel parse_kernel(const std::string& name);

}  // namespace levattn
