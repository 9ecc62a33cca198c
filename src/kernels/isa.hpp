// kernels/isa.hpp: which instruction set the hand-vectorised kernels run on. The CPU is probed
// once; LEVATTN_ISA=avx512|avx2|baseline forces a path (to test or benchmark every path on one
// machine). The choice is read at every entry point, never cached, so no state is global.
#pragma once
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LEVATTN_X86_KERNELS 1
#else
#define LEVATTN_X86_KERNELS 0
#endif

namespace levattn::kernels {

enum class Isa { baseline, avx2, avx512 };

/// "baseline", "avx2" or "avx512".
std::string to_string(Isa isa);

/// The best instruction set this CPU (and this build) runs: avx512 needs AVX-512F, avx2 needs
/// AVX2 and FMA; the operating system must enable their register state.
Isa cpu_isa();

/// Whether the CPU runs `isa`.
bool cpu_supports(Isa isa);

/// cpu_isa(), or the path LEVATTN_ISA names. Throws Error(invalid_argument) naming the variable
/// for a value other than avx512, avx2, baseline (or empty), or an ISA this CPU lacks.
Isa active_isa();

}  // namespace levattn::kernels
