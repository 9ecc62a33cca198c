// kernels/bf16_avx512.cpp: the bfloat16 products (kernels/bf16.hpp), built with AVX512_BF16
// and called only where the CPU has it.
#include "kernels/bf16.hpp"

#include <algorithm>

#include <immintrin.h>

namespace levattn::kernels {

bool bf16_available() {
  __builtin_cpu_init();
  // AVX512BW for the 16-bit interleave of bf16_pairs_down_columns (every CPU with BF16 has it).
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

void bf16_pairs_along_rows(const float* x, index_t rows, index_t cols, index_t ld, std::uint32_t* out) {
  const index_t pairs = (cols + 1) / 2;
  for (index_t r = 0; r < rows; ++r) {
    const float* row = x + r * ld;
    std::uint32_t* o = out + r * pairs;
    index_t t = 0;
    for (; 2 * t + 32 <= cols; t += 16) {  // 32 entries: two vectors into one of 32 bfloat16
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 2 * t + 16), _mm512_loadu_ps(row + 2 * t));
      _mm512_storeu_si512(o + t, reinterpret_cast<const __m512i&>(h));
    }
    for (; t < pairs; ++t) {
      const std::uint32_t hi = 2 * t + 1 < cols ? to_bf16(row[2 * t + 1]) : 0u;
      o[t] = (hi << 16) | to_bf16(row[2 * t]);
    }
  }
}

void bf16_pairs_down_columns(const float* x, index_t rows, index_t cols, index_t ld, std::uint32_t* out) {
  for (index_t t = 0; 2 * t < rows; ++t) {
    const float* lo = x + 2 * t * ld;
    const float* hi = 2 * t + 1 < rows ? lo + ld : nullptr;
    std::uint32_t* o = out + t * cols;
    index_t c = 0;
    if (hi) {
      for (; c + 16 <= cols; c += 16) {  // (lo, hi) interleaved: 16 pairs per vector
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(hi + c), _mm512_loadu_ps(lo + c));
        // h holds lo[0..16) then hi[0..16) as bfloat16; interleave them into pairs.
        const __m512i v = reinterpret_cast<const __m512i&>(h);
        const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                             22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        _mm512_storeu_si512(o + c, _mm512_permutexvar_epi16(idx, v));
      }
    }
    for (; c < cols; ++c) o[c] = (hi ? std::uint32_t{to_bf16(hi[c])} << 16 : 0u) | to_bf16(lo[c]);
  }
}

namespace {

// r[c] <- column c of the 16 x 16 words r[0 .. 16) (rows): pairs of words, then of pairs, then
// 128-bit lanes exchanged.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// Up to 32 entries of a row (the rest 0) as 16 pairs.
inline __m512i pairs16(const float* x, index_t count) {
  const auto mask = [](index_t w) { return static_cast<__mmask16>((1u << std::clamp<index_t>(w, 0, 16)) - 1u); };
  const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(mask(count - 16), x + 16), _mm512_maskz_loadu_ps(mask(count), x));
  return (__m512i)h;
}

}  // namespace

void bf16_pairs_transposed(const float* x, index_t rows, index_t cols, index_t ld, std::uint32_t* out) {
  const index_t pairs = (cols + 1) / 2;
  index_t j0 = 0;
  for (; j0 + 16 <= rows; j0 += 16)  // 16 rows at a time: 16 x 16 pairs transposed in registers
    for (index_t t0 = 0; t0 < pairs; t0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = pairs16(x + (j0 + i) * ld + 2 * t0, cols - 2 * t0);
      transpose16(r);
      for (index_t c = 0; c < std::min<index_t>(16, pairs - t0); ++c) _mm512_storeu_si512(out + (t0 + c) * rows + j0, r[c]);
    }
  for (index_t j = j0; j < rows; ++j)
    for (index_t t = 0; t < pairs; ++t) {
      const std::uint32_t hi = 2 * t + 1 < cols ? to_bf16(x[j * ld + 2 * t + 1]) : 0u;
      out[t * rows + j] = (hi << 16) | to_bf16(x[j * ld + 2 * t]);
    }
}

namespace {

// R rows (1 to 4) x 4 vectors (64 columns) of C, the columns beyond n masked: 16 independent
// sums in named registers (GCC keeps an array of them in memory, storing it at every step).
template <int R>
void block(index_t n0, index_t n, index_t pairs, float alpha, float beta, const std::uint32_t* A, index_t lda,
           const std::uint32_t* B, index_t ldb, float* C, index_t ldc) {
  __mmask16 m[4];
  for (int v = 0; v < 4; ++v) {
    const index_t w = std::clamp<index_t>(n - n0 - 16 * v, 0, 16);
    m[v] = static_cast<__mmask16>((1u << w) - 1u);
  }
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  __m512 c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
  const std::uint32_t* b = B + n0;
  for (index_t t = 0; t < pairs; ++t, b += ldb) {
    const auto b0 = (__m512bh)_mm512_maskz_loadu_epi32(m[0], b), b1 = (__m512bh)_mm512_maskz_loadu_epi32(m[1], b + 16);
    const auto b2 = (__m512bh)_mm512_maskz_loadu_epi32(m[2], b + 32), b3 = (__m512bh)_mm512_maskz_loadu_epi32(m[3], b + 48);
    const auto row = [&](int r, __m512& x0, __m512& x1, __m512& x2, __m512& x3) {
      const auto a = (__m512bh)_mm512_set1_epi32(static_cast<int>(A[r * lda + t]));
      x0 = _mm512_dpbf16_ps(x0, a, b0), x1 = _mm512_dpbf16_ps(x1, a, b1);
      x2 = _mm512_dpbf16_ps(x2, a, b2), x3 = _mm512_dpbf16_ps(x3, a, b3);
    };
    row(0, c00, c01, c02, c03);
    if constexpr (R > 1) row(1, c10, c11, c12, c13);
    if constexpr (R > 2) row(2, c20, c21, c22, c23);
    if constexpr (R > 3) row(3, c30, c31, c32, c33);
  }
  const __m512 al = _mm512_set1_ps(alpha);
  const auto store = [&](int r, __m512 x0, __m512 x1, __m512 x2, __m512 x3) {
    float* c = C + r * ldc + n0;
    const __m512 x[4] = {x0, x1, x2, x3};
    for (int v = 0; v < 4; ++v) {
      __m512 y = _mm512_mul_ps(al, x[v]);
      if (beta != 0.0f) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(m[v], c + 16 * v));
      _mm512_mask_storeu_ps(c + 16 * v, m[v], y);
    }
  };
  store(0, c00, c01, c02, c03);
  if constexpr (R > 1) store(1, c10, c11, c12, c13);
  if constexpr (R > 2) store(2, c20, c21, c22, c23);
  if constexpr (R > 3) store(3, c30, c31, c32, c33);
}

}  // namespace

void bf16_gemm(index_t rows, index_t n, index_t pairs, float alpha, float beta, const std::uint32_t* A, index_t lda,
               const std::uint32_t* B, index_t ldb, float* C, index_t ldc) {
  // Column strips of 64 outside, so a strip of B (pairs x 64 words) stays in L1 across the row
  // blocks.
  for (index_t n0 = 0; n0 < n; n0 += 64) {
    index_t r = 0;
    for (; r + 4 <= rows; r += 4) block<4>(n0, n, pairs, alpha, beta, A + r * lda, lda, B, ldb, C + r * ldc, ldc);
    const std::uint32_t* a = A + r * lda;
    float* c = C + r * ldc;
    if (rows - r == 3) block<3>(n0, n, pairs, alpha, beta, a, lda, B, ldb, c, ldc);
    if (rows - r == 2) block<2>(n0, n, pairs, alpha, beta, a, lda, B, ldb, c, ldc);
    if (rows - r == 1) block<1>(n0, n, pairs, alpha, beta, a, lda, B, ldb, c, ldc);
  }
}

}  // namespace levattn::kernels
