// kernels/bf16.hpp: products with bfloat16 inputs and float32 sums (AVX512_BF16's vdpbf16ps), the
// engine's path for Precision::bfloat16 where the CPU has it. Operands are packed as pairs of
// bfloat16 in one 32-bit word along the summed dimension: a pair (x_2t, x_2t+1) is what one lane
// of vdpbf16ps multiplies and adds.
#pragma once
#include <cstdint>

#include "levattn/matrix.hpp"

namespace levattn::kernels {

/// Whether this build and CPU run the bfloat16 products (AVX512F, AVX512BW and AVX512_BF16).
bool bf16_available();

/// Round to nearest even, as vcvtne2ps2bf16 does (x finite).
inline std::uint16_t to_bf16(float x) {
  std::uint32_t u;
  static_assert(sizeof u == sizeof x);
  __builtin_memcpy(&u, &x, sizeof u);
  return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/// out[r * pairs + t] = (x[r, 2t], x[r, 2t + 1]) for r < rows, t < pairs = ceil(cols / 2), the
/// missing half of an odd row 0: x (rows x cols, leading dimension ld) paired along its rows.
void bf16_pairs_along_rows(const float* x, index_t rows, index_t cols, index_t ld, std::uint32_t* out);

/// out[t * cols + c] = (x[2t, c], x[2t + 1, c]) for t < ceil(rows / 2), c < cols (the missing
/// row of an odd count 0): x (rows x cols, leading dimension ld) paired down its columns.
void bf16_pairs_down_columns(const float* x, index_t rows, index_t cols, index_t ld, std::uint32_t* out);

/// out[t * rows + j] = (x[j, 2t], x[j, 2t + 1]) for t < ceil(cols / 2), j < rows (the missing
/// half of an odd row 0): x (rows x cols, leading dimension ld) paired along its rows and
/// transposed, a tile of keys as the right operand of the logits.
void bf16_pairs_transposed(const float* x, index_t rows, index_t cols, index_t ld, std::uint32_t* out);

/// C <- alpha A B + beta C in float32 (beta 0 or 1) for A (rows x pairs) and B (pairs x n) of
/// bfloat16 pairs (leading dimensions lda and ldb, in words), C (rows x n, leading dimension
/// ldc): every product of two bfloat16 values exact, summed in float32. Requires bf16_available().
void bf16_gemm(index_t rows, index_t n, index_t pairs, float alpha, float beta, const std::uint32_t* A, index_t lda,
               const std::uint32_t* B, index_t ldb, float* C, index_t ldc);

}  // namespace levattn::kernels
