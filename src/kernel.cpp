// The kernel of attention: its names, the logit scale and its option checks (levattn/kernel.hpp).
#include "levattn/kernel.hpp"

#include <cmath>
#include <utility>

#include "detail/names.hpp"
#include "detail/validate.hpp"
#include "kernels/bf16.hpp"
#include "kernels/isa.hpp"

namespace levattn {
namespace {

constexpr std::pair<Kernel, const char*> kKernelNames[] = {{Kernel::softmax, "softmax"}, {Kernel::power, "poly"}};
constexpr std::pair<Precision, const char*> kPrecisionNames[] = {{Precision::float32, "float32"},
                                                                 {Precision::bfloat16, "bf16"}};

}  // namespace

std::string to_string(Kernel k) { return detail::name_of(kKernelNames, k); }

Kernel parse_kernel(const std::string& name) {
  return detail::parse_name(kKernelNames, name == "power" ? "poly" : name, "kernel");  // "power": the enum's name
}

std::string to_string(Precision p) { return detail::name_of(kPrecisionNames, p); }

Precision parse_precision(const std::string& name) { return detail::parse_name(kPrecisionNames, name, "precision"); }

bool bf16_products() { return kernels::active_isa() == kernels::Isa::avx512 && kernels::bf16_available(); }

double logit_scale(const KernelOptions& o, index_t d) {
  if (!std::isnan(o.scale)) return o.scale;
  return o.kernel == Kernel::softmax ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0;
}

void detail::check_kernel(const KernelOptions& o) {
  LEVATTN_REQUIRE(o.kernel != Kernel::power || (o.p > 0.0 && std::isfinite(o.p)), "p",
                  "expected a finite exponent > 0, got ", o.p);
  LEVATTN_REQUIRE(std::isnan(o.scale) || std::isfinite(o.scale), "scale", "expected a finite number, got ", o.scale);
}

}  // namespace levattn
