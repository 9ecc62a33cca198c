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

/// The precision of the attention engine's products (the logits q.k and the weighted values).
enum class Precision {
  float32,   ///< float32 inputs and sums
  bfloat16,  ///< inputs rounded to bfloat16 (8 significant bits), exact products, float32 sums
};

/// The kernel of attention: what attention over a given selection reads (selected_attention.hpp).
struct KernelOptions {
  Kernel kernel = Kernel::softmax;
  double p = 2.0;  ///< exponent of the power kernel, > 0
  /// Logit scale; NaN means the default (1/sqrt(d) for softmax, 1 for power). Must be finite.
  double scale = std::numeric_limits<double>::quiet_NaN();
  /// bfloat16: the forward's products over tiles of more than 64 keys take bfloat16 inputs
  /// (vdpbf16ps) where the CPU has AVX512_BF16 and the AVX-512 kernels run (bf16_products());
  /// elsewhere, and for narrower tiles, a query's own keys and the backward, float32. The
  /// softmax, its normaliser and the sums stay float32. Error against float64 in
  /// docs/benchmarks.md.
  Precision precision = Precision::float32;
};

/// Whether Precision::bfloat16 takes effect in this process: the CPU has AVX512_BF16 (and
/// AVX512BW), this build has its kernels and the AVX-512 kernels are in use (LEVATTN_ISA).
bool bf16_products();

/// The logit scale a call uses: options.scale, or its kernel's default (1/sqrt(d) for softmax,
/// 1 for power) when that is NaN.
double logit_scale(const KernelOptions& options, index_t d);

/// The name used by the CLI and in messages: "softmax" or "poly".
std::string to_string(Kernel k);

/// The inverse of to_string ("power" is accepted for "poly"). Throws Error(invalid_argument)
/// naming the choices for any other name.
Kernel parse_kernel(const std::string& name);

/// "float32" or "bf16"; parse_precision is its inverse (Error(invalid_argument) naming the
/// choices otherwise).
std::string to_string(Precision p);
Precision parse_precision(const std::string& name);

}  // namespace levattn
