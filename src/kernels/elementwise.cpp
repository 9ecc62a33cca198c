#include "kernels/elementwise.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define LEVATTN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LEVATTN_CLONES
#endif

namespace levattn::kernels {
namespace {

// exp for x <= 0 (after the max shift) in branch-free arithmetic so loops vectorise:
// 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, degree-6 Taylor polynomial (error < 1.2e-7).
inline float exp_nonpositive(float x) {
  const float lo = -87.0f;  // below: e^x < 1.7e-38, returned as 0
  const float xc = x < lo ? lo : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const std::int32_t e = (static_cast<std::int32_t>(n) + 127) << 23;
  const float s = std::bit_cast<float>(e);
  return x < lo ? 0.0f : p * s;
}

}  // namespace

LEVATTN_CLONES float row_max(const float* x, index_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

LEVATTN_CLONES float exp_shift_sum(float* x, index_t n, float shift) {
  float sum = 0.0f;
  for (index_t j = 0; j < n; ++j) {
    const float e = exp_nonpositive(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  return sum;
}

LEVATTN_CLONES float abs_row_max(float* x, index_t n) {
  float m = -1.0f;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < n; ++j) {
    const float a = x[j] == ninf ? -1.0f : std::fabs(x[j]);
    x[j] = a;
    m = a > m ? a : m;
  }
  return m;
}

float power_rel_sum(float* x, index_t n, float m, float p) {
  const float inv = 1.0f / m;
  float sum = 0.0f;
  if (p == 1.0f) {
    for (index_t j = 0; j < n; ++j) {
      const float w = x[j] < 0.0f ? 0.0f : x[j] * inv;
      x[j] = w;
      sum += w;
    }
  } else if (p == 2.0f) {
    for (index_t j = 0; j < n; ++j) {
      const float r = x[j] * inv;
      const float w = x[j] < 0.0f ? 0.0f : r * r;
      x[j] = w;
      sum += w;
    }
  } else {
    for (index_t j = 0; j < n; ++j) {
      const float w = x[j] <= 0.0f ? 0.0f : std::pow(x[j] * inv, p);
      x[j] = w;
      sum += w;
    }
  }
  return sum;
}

}  // namespace levattn::kernels
