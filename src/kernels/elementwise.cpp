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
  const float xc = x >= lo ? x : lo;  // NaN -> lo: the integer conversion below stays defined
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

// Reductions keep kLanes independent partial results so the compiler can vectorise them without
// reassociating floating-point sums (which it may not do under strict IEEE semantics).
constexpr index_t kLanes = 16;

LEVATTN_CLONES float row_max(const float* x, index_t n) {
  float lane[kLanes];
  for (auto& v : lane) v = -std::numeric_limits<float>::infinity();
  index_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (index_t l = 0; l < kLanes; ++l) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
  float m = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  for (float v : lane) m = v > m ? v : m;
  return m;
}

LEVATTN_CLONES float exp_shift_sum(float* x, index_t n, float shift) {
  float lane[kLanes] = {};
  index_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (index_t l = 0; l < kLanes; ++l) {
      const float e = exp_nonpositive(x[j + l] - shift);
      x[j + l] = e;
      lane[l] += e;
    }
  float sum = 0.0f;
  for (; j < n; ++j) {
    const float e = exp_nonpositive(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  for (float v : lane) sum += v;
  return sum;
}

LEVATTN_CLONES float abs_row_max(float* x, index_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  float lane[kLanes];
  for (auto& v : lane) v = -1.0f;
  index_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (index_t l = 0; l < kLanes; ++l) {
      const float a = x[j + l] == ninf ? -1.0f : std::fabs(x[j + l]);
      x[j + l] = a;
      lane[l] = a > lane[l] ? a : lane[l];
    }
  float m = -1.0f;
  for (; j < n; ++j) {
    const float a = x[j] == ninf ? -1.0f : std::fabs(x[j]);
    x[j] = a;
    m = a > m ? a : m;
  }
  for (float v : lane) m = v > m ? v : m;
  return m;
}

namespace {
// w = (x / m)^p for x >= 0, 0 for the -1 mask; `pow` is the scalar power used for general p.
template <class Pow>
float power_sum(float* x, index_t n, float inv, Pow pow) {
  float lane[kLanes] = {};
  index_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (index_t l = 0; l < kLanes; ++l) {
      const float w = x[j + l] < 0.0f ? 0.0f : pow(x[j + l] * inv);
      x[j + l] = w;
      lane[l] += w;
    }
  float sum = 0.0f;
  for (; j < n; ++j) {
    const float w = x[j] < 0.0f ? 0.0f : pow(x[j] * inv);
    x[j] = w;
    sum += w;
  }
  for (float v : lane) sum += v;
  return sum;
}
}  // namespace

LEVATTN_CLONES float power_rel_sum(float* x, index_t n, float m, float p) {
  const float inv = 1.0f / m;
  if (p == 1.0f) return power_sum(x, n, inv, [](float r) { return r; });
  if (p == 2.0f) return power_sum(x, n, inv, [](float r) { return r * r; });
  return power_sum(x, n, inv, [p](float r) { return r > 0.0f ? std::pow(r, p) : 0.0f; });
}

}  // namespace levattn::kernels
