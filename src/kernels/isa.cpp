#include "kernels/isa.hpp"

#include <cstdlib>
#include <string_view>

#include "detail/require.hpp"
#include "kernels/elementwise.hpp"
#include "levattn/error.hpp"

namespace levattn::kernels {

std::string to_string(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    case Isa::baseline: return "baseline";
  }
  return "baseline";
}

bool cpu_supports(Isa isa) {
  if (isa == Isa::baseline) return true;
#if LEVATTN_X86_KERNELS
  // libgcc's probe also checks (XGETBV) that the OS saves the AVX / AVX-512 registers.
  __builtin_cpu_init();
  if (isa == Isa::avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return __builtin_cpu_supports("avx512f") != 0;
#else
  return false;
#endif
}

Isa cpu_isa() {
  if (cpu_supports(Isa::avx512)) return Isa::avx512;
  if (cpu_supports(Isa::avx2)) return Isa::avx2;
  return Isa::baseline;
}

Isa active_isa() {
  const char* env = std::getenv("LEVATTN_ISA");
  if (env == nullptr || *env == '\0') return cpu_isa();
  const std::string_view v(env);
  Isa want;
  if (v == "avx512") want = Isa::avx512;
  else if (v == "avx2") want = Isa::avx2;
  else if (v == "baseline") want = Isa::baseline;
  else
    detail::fail(ErrorKind::invalid_argument, "LEVATTN_ISA", "expected avx512, avx2 or baseline, got '", v, "'");
  LEVATTN_REQUIRE(cpu_supports(want), "LEVATTN_ISA=" + std::string(v), "this CPU does not support it (best: ",
                  to_string(cpu_isa()), ")");
  return want;
}

const RowOps& row_ops(Isa isa) {
  LEVATTN_REQUIRE(cpu_supports(isa), "isa", "this CPU does not support ", to_string(isa));
#if LEVATTN_X86_KERNELS
  if (isa == Isa::avx512) return row_ops_avx512();
  if (isa == Isa::avx2) return row_ops_avx2();
#endif
  return row_ops_baseline();
}

const RowOps& active_row_ops() { return row_ops(active_isa()); }

}  // namespace levattn::kernels
