// kernels/simd.hpp: the few vector operations the row kernels need, one traits struct per
// instruction set (8 lanes of AVX2+FMA, 16 of AVX-512, 1 for the portable baseline). Included only
// by the per-ISA translation units (elementwise_*.cpp), each compiled for its own ISA; everything
// here has internal linkage so that no code built for one ISA can be linked into another's caller.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace levattn::kernels {
namespace {

/// One lane: the baseline, and the tail of every vector loop.
struct Scalar {
  using reg = float;
  static constexpr int width = 1;
  static reg load(const float* p) { return *p; }
  static void store(float* p, reg v) { *p = v; }
  static reg set1(float x) { return x; }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg div(reg a, reg b) { return a / b; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
  static reg max(reg a, reg b) { return a > b ? a : b; }
  static reg abs(reg a) { return a < 0.0f ? -a : a; }
  /// Nearest integer for |a| < 2^22 (adding 1.5 * 2^23 rounds in the default rounding mode).
  static reg round(reg a) {
    const float magic = 12582912.0f;
    return (a + magic) - magic;
  }
  /// 2^n for integral n in [-126, 127].
  static reg pow2i(reg n) {
    const std::int32_t e = (static_cast<std::int32_t>(n) + 127) << 23;
    float out;
    std::memcpy(&out, &e, sizeof out);
    return out;
  }
  /// a < b ? x : y, lane by lane.
  static reg select_lt(reg a, reg b, reg x, reg y) { return a < b ? x : y; }
  /// a == b ? x : y, lane by lane.
  static reg select_eq(reg a, reg b, reg x, reg y) { return a == b ? x : y; }
  /// Whether some lane has lo <= x < hi.
  static bool any_between(reg x, reg lo, reg hi) { return x >= lo && x < hi; }
  static bool any_above(reg x, reg t) { return x > t; }
  static unsigned mask_above(reg x, reg t) { return x > t; }
  static unsigned mask_between(reg x, reg lo, reg hi) { return x >= lo && x < hi; }
  static float hsum(reg a) { return a; }
  static float hmax(reg a) { return a; }
};

/// float64 lanes, for the Gram accumulator: the same operations on doubles.
struct ScalarD {
  using reg = double;
  static constexpr int width = 1;
  static reg load(const double* p) { return *p; }
  static void store(double* p, reg v) { *p = v; }
  static reg set1(double x) { return x; }
  static reg fmadd(reg a, reg b, reg c) { return a * b + c; }
};

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2D {
  using reg = __m256d;
  static constexpr int width = 4;
  static reg load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, reg v) { _mm256_storeu_pd(p, v); }
  static reg set1(double x) { return _mm256_set1_pd(x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
};

struct Avx2 {
  using reg = __m256;
  static constexpr int width = 8;
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg abs(reg a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static reg round(reg a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg pow2i(reg n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
  }
  static reg select_lt(reg a, reg b, reg x, reg y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  static reg select_eq(reg a, reg b, reg x, reg y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_EQ_OQ));
  }
  static bool any_between(reg x, reg lo, reg hi) {
    return _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), _mm256_cmp_ps(x, hi, _CMP_LT_OQ))) != 0;
  }
  static bool any_above(reg x, reg t) { return _mm256_movemask_ps(_mm256_cmp_ps(x, t, _CMP_GT_OQ)) != 0; }
  static unsigned mask_above(reg x, reg t) {
    return static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(x, t, _CMP_GT_OQ)));
  }
  static unsigned mask_between(reg x, reg lo, reg hi) {
    return static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), _mm256_cmp_ps(x, hi, _CMP_LT_OQ))));
  }
  static float hsum(reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(reg a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};
#endif

#if defined(__AVX512F__)
struct Avx512D {
  using reg = __m512d;
  static constexpr int width = 8;
  static reg load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static reg set1(double x) { return _mm512_set1_pd(x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
};

struct Avx512 {
  using reg = __m512;
  static constexpr int width = 16;
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg abs(reg a) { return _mm512_abs_ps(a); }
  static reg round(reg a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static reg pow2i(reg n) {
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
  }
  static reg select_lt(reg a, reg b, reg x, reg y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  static reg select_eq(reg a, reg b, reg x, reg y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ), y, x);
  }
  static bool any_between(reg x, reg lo, reg hi) {
    return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), x, hi, _CMP_LT_OQ) != 0;
  }
  static bool any_above(reg x, reg t) { return _mm512_cmp_ps_mask(x, t, _CMP_GT_OQ) != 0; }
  static unsigned mask_above(reg x, reg t) { return _mm512_cmp_ps_mask(x, t, _CMP_GT_OQ); }
  static unsigned mask_between(reg x, reg lo, reg hi) {
    return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), x, hi, _CMP_LT_OQ);
  }
  static float hsum(reg a) { return _mm512_reduce_add_ps(a); }
  static float hmax(reg a) { return _mm512_reduce_max_ps(a); }
};
#endif

}  // namespace
}  // namespace levattn::kernels
