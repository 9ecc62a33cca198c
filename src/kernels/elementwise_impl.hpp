// kernels/elementwise_impl.hpp: the row operations of elementwise.hpp written once over the
// vector traits of simd.hpp. Each elementwise_<isa>.cpp includes this with its own compiler
// flags and instantiates it for its traits; the anonymous namespace keeps the copies apart.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>

#include "kernels/elementwise.hpp"
#include "kernels/simd.hpp"

namespace levattn::kernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 (after the max shift), branch-free: 2^k e^r with k = round(x / ln 2),
// |r| <= ln 2 / 2 (Cody-Waite split of ln 2), degree-6 Taylor polynomial (error < 1.2e-7).
// Below -87, e^x < 1.7e-38 is returned as 0; that also maps the -inf masks (and NaN) to 0.
template <class V>
typename V::reg exp_nonpositive(typename V::reg x) {
  const auto lo = V::set1(-87.0f);
  const auto xc = V::max(x, lo);  // NaN -> lo: the integer conversion stays defined
  const auto k = V::round(V::mul(xc, V::set1(1.44269504088896341f)));
  auto r = V::fmadd(k, V::set1(-0.693359375f), xc);
  r = V::fmadd(k, V::set1(2.12194440e-4f), r);
  auto p = V::set1(1.0f / 720);
  p = V::fmadd(p, r, V::set1(1.0f / 120));
  p = V::fmadd(p, r, V::set1(1.0f / 24));
  p = V::fmadd(p, r, V::set1(1.0f / 6));
  p = V::fmadd(p, r, V::set1(0.5f));
  p = V::fmadd(p, r, V::set1(1.0f));
  p = V::fmadd(p, r, V::set1(1.0f));
  return V::select_lt(x, lo, V::set1(0.0f), V::mul(p, V::pow2i(k)));
}

// Each loop runs two vector accumulators (independent dependency chains), then the scalar tail.
template <class V>
float row_max(const float* x, index_t n) {
  constexpr index_t W = V::width;
  auto a0 = V::set1(-kInf), a1 = V::set1(-kInf);
  index_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    a0 = V::max(a0, V::load(x + j));
    a1 = V::max(a1, V::load(x + j + W));
  }
  for (; j + W <= n; j += W) a0 = V::max(a0, V::load(x + j));
  float m = V::hmax(V::max(a0, a1));
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <class V>
float exp_shift_sum(float* x, index_t n, float shift) {
  constexpr index_t W = V::width;
  const auto s = V::set1(shift);
  auto a0 = V::set1(0.0f), a1 = V::set1(0.0f);
  index_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const auto e0 = exp_nonpositive<V>(V::sub(V::load(x + j), s));
    const auto e1 = exp_nonpositive<V>(V::sub(V::load(x + j + W), s));
    V::store(x + j, e0);
    V::store(x + j + W, e1);
    a0 = V::add(a0, e0);
    a1 = V::add(a1, e1);
  }
  for (; j + W <= n; j += W) {
    const auto e = exp_nonpositive<V>(V::sub(V::load(x + j), s));
    V::store(x + j, e);
    a0 = V::add(a0, e);
  }
  float sum = V::hsum(V::add(a0, a1));
  for (; j < n; ++j) {
    const float e = exp_nonpositive<Scalar>(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  return sum;
}

template <class V>
typename V::reg abs_or_mask(typename V::reg v) {
  return V::select_eq(v, V::set1(-kInf), V::set1(-1.0f), V::abs(v));
}

template <class V>
float abs_row_max(float* x, index_t n) {
  constexpr index_t W = V::width;
  auto a0 = V::set1(-1.0f);
  index_t j = 0;
  for (; j + W <= n; j += W) {
    const auto a = abs_or_mask<V>(V::load(x + j));
    V::store(x + j, a);
    a0 = V::max(a0, a);
  }
  float m = V::hmax(a0);
  for (; j < n; ++j) {
    const float a = abs_or_mask<Scalar>(x[j]);
    x[j] = a;
    m = a > m ? a : m;
  }
  return m;
}

// w = r^p with r = x / m for x >= 0, 0 for the -1 mask. Pow::apply<T> is r -> r^p on one
// register of traits T (the vector loop and the scalar tail use the same formula).
template <class V, class Pow>
float power_sum(float* x, index_t n, float inv, Pow pow) {
  constexpr index_t W = V::width;
  const auto vi = V::set1(inv), zero = V::set1(0.0f);
  auto a0 = zero;
  index_t j = 0;
  for (; j + W <= n; j += W) {
    const auto v = V::load(x + j);
    const auto w = V::select_lt(v, zero, zero, pow.template apply<V>(V::mul(v, vi)));
    V::store(x + j, w);
    a0 = V::add(a0, w);
  }
  float sum = V::hsum(a0);
  for (; j < n; ++j) {
    const float w = x[j] < 0.0f ? 0.0f : pow.template apply<Scalar>(x[j] * inv);
    x[j] = w;
    sum += w;
  }
  return sum;
}

struct PowOne {
  template <class T> typename T::reg apply(typename T::reg r) const { return r; }
};
struct PowTwo {
  template <class T> typename T::reg apply(typename T::reg r) const { return T::mul(r, r); }
};
struct PowAny {  // one powf per entry: there is no vector pow here
  float p;
  template <class T> float apply(float r) const { return r > 0.0f ? std::pow(r, p) : 0.0f; }
};

template <class V>
float power_rel_sum(float* x, index_t n, float m, float p) {
  const float inv = 1.0f / m;
  if (p == 1.0f) return power_sum<V>(x, n, inv, PowOne{});
  if (p == 2.0f) return power_sum<V>(x, n, inv, PowTwo{});
  return power_sum<Scalar>(x, n, inv, PowAny{p});
}

// The power kernel's weight and logit gradient of one register: w = (|s| inv)^p (0 where masked,
// s = -inf), ds = p w (dp - delta) / s (0 at s = 0).
template <class T, class Pow>
void power_grads(const float* s, float* p, float* dp, typename T::reg inv, typename T::reg pw,
                 typename T::reg delta, Pow pow) {
  const auto zero = T::set1(0.0f), x = T::load(s);
  const auto w = T::select_eq(x, T::set1(-kInf), zero, pow.template apply<T>(T::mul(T::abs(x), inv)));
  const auto g = T::div(T::mul(T::mul(pw, w), T::sub(T::load(dp), delta)), x);
  T::store(p, w);
  T::store(dp, T::select_eq(w, zero, zero, g));
}

template <class V, class Pow>
void power_weight_grads(const float* s, float* p, float* dp, index_t n, float inv, float pw, float delta, Pow pow) {
  constexpr index_t W = V::width;
  index_t j = 0;
  for (; j + W <= n; j += W) power_grads<V>(s + j, p + j, dp + j, V::set1(inv), V::set1(pw), V::set1(delta), pow);
  for (; j < n; ++j) power_grads<Scalar>(s + j, p + j, dp + j, inv, pw, delta, pow);
}

template <class V>
void weight_grads(const float* s, float* p, float* dp, index_t n, float L, float power, float delta) {
  constexpr index_t W = V::width;
  if (power > 0.0f) {
    const auto inv = static_cast<float>(std::exp(-static_cast<double>(L) / power));
    if (power == 1.0f) return power_weight_grads<V>(s, p, dp, n, inv, power, delta, PowOne{});
    if (power == 2.0f) return power_weight_grads<V>(s, p, dp, n, inv, power, delta, PowTwo{});
    return power_weight_grads<Scalar>(s, p, dp, n, inv, power, delta, PowAny{power});
  }
  const auto l = V::set1(L), dl = V::set1(delta);
  index_t j = 0;
  for (; j + W <= n; j += W) {
    const auto e = exp_nonpositive<V>(V::sub(V::load(s + j), l));
    V::store(p + j, e);
    V::store(dp + j, V::mul(e, V::sub(V::load(dp + j), dl)));
  }
  for (; j < n; ++j) {
    const float e = exp_nonpositive<Scalar>(s[j] - L);
    p[j] = e;
    dp[j] = e * (dp[j] - delta);
  }
}

// x - x is 0 for a finite x and NaN for NaN or Inf, so the sum of all x - x tells whether every
// entry is finite, with nothing but vector arithmetic.
template <class V>
float max_abs(const float* x, index_t n) {
  constexpr index_t W = V::width;
  auto m0 = V::set1(0.0f), m1 = V::set1(0.0f), z = V::set1(0.0f);
  index_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const auto a = V::load(x + j), b = V::load(x + j + W);
    z = V::add(z, V::add(V::sub(a, a), V::sub(b, b)));
    m0 = V::max(m0, V::abs(a));
    m1 = V::max(m1, V::abs(b));
  }
  float m = V::hmax(V::max(m0, m1)), finite = V::hsum(z);
  for (; j < n; ++j) {
    finite += x[j] - x[j];
    const float a = Scalar::abs(x[j]);
    m = a > m ? a : m;
  }
  return finite == 0.0f ? m : -1.0f;
}

// Two passes: the maximum of x - shift, then the first entry that reaches it (the same
// differences, so the same bits).
template <class V>
index_t argmax_shifted(const float* x, const float* shift, index_t n) {
  constexpr index_t W = V::width;
  auto mv = V::set1(-std::numeric_limits<float>::infinity());
  index_t j = 0;
  for (; j + W <= n; j += W) mv = V::max(mv, V::sub(V::load(x + j), V::load(shift + j)));
  float m = V::hmax(mv);
  for (; j < n; ++j) m = std::max(m, x[j] - shift[j]);
  const auto below = V::set1(std::nextafter(m, -std::numeric_limits<float>::infinity()));
  for (j = 0; j + W <= n; j += W)
    if (const unsigned bits = V::mask_above(V::sub(V::load(x + j), V::load(shift + j)), below); bits != 0)
      return j + std::countr_zero(bits);
  for (; j < n; ++j)
    if (x[j] - shift[j] >= m) return j;
  return 0;  // every difference -inf
}

// A plain loop: compiled in each instruction set's unit, it vectorises to that unit's width.
template <class V>
bool widen(const float* x, index_t n, double* y) {
  std::uint32_t bad = 0;
  for (index_t j = 0; j < n; ++j) {
    y[j] = static_cast<double>(x[j]);
    bad |= static_cast<std::uint32_t>((std::bit_cast<std::uint32_t>(x[j]) & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// The narrow products keep RB rows x NR vectors of accumulators in registers (both constants, so
// the arrays unroll into them): RB independent chains hide the latency of the fused multiply-adds.
template <int NR>
constexpr int rows_per_block() {
  return NR >= 8 ? 1 : NR >= 4 ? 2 : 4;
}

// Rows i0 .. i0 + RB - 1 of C = alpha A Bt, over NR whole vectors of columns.
template <class V, int NR, int RB>
void narrow_block(index_t d, float alpha, const float* A, index_t lda, const float* Bt, index_t count,
                  float* C, index_t ldc) {
  constexpr index_t W = V::width;
  typename V::reg acc[RB][NR];
  for (int q = 0; q < RB; ++q)
    for (int r = 0; r < NR; ++r) acc[q][r] = V::set1(0.0f);
  for (index_t t = 0; t < d; ++t) {
    const float* b = Bt + t * count;
    typename V::reg bt[NR];
    for (int r = 0; r < NR; ++r) bt[r] = V::load(b + r * W);
    for (int q = 0; q < RB; ++q) {
      const auto at = V::set1(A[q * lda + t]);
      for (int r = 0; r < NR; ++r) acc[q][r] = V::fmadd(at, bt[r], acc[q][r]);
    }
  }
  const auto va = V::set1(alpha);
  for (int q = 0; q < RB; ++q)
    for (int r = 0; r < NR; ++r) V::store(C + q * ldc + r * W, V::mul(va, acc[q][r]));
}

template <class V, int NR>
void narrow_rows(index_t rows, index_t count, index_t d, float alpha, const float* A, index_t lda,
                 const float* Bt, float* C, index_t ldc) {
  constexpr int RB = rows_per_block<NR>();
  index_t i = 0;
  for (; i + RB <= rows; i += RB) narrow_block<V, NR, RB>(d, alpha, A + i * lda, lda, Bt, count, C + i * ldc, ldc);
  for (; i < rows; ++i) narrow_block<V, NR, 1>(d, alpha, A + i * lda, lda, Bt, count, C + i * ldc, ldc);
}

// C (rows x count) = alpha A Bt for count <= kNarrowTile: whole vectors by narrow_rows, the last
// count % W columns lane by lane.
template <class V>
void narrow_logits(index_t rows, index_t count, index_t d, float alpha, const float* A, index_t lda,
                   const float* Bt, float* C, index_t ldc) {
  constexpr index_t W = V::width;
  using Rows = void (*)(index_t, index_t, index_t, float, const float*, index_t, const float*, float*, index_t);
  static constexpr Rows by_regs[] = {nullptr,
                                     &narrow_rows<V, 1>, &narrow_rows<V, 2>, &narrow_rows<V, 3>, &narrow_rows<V, 4>,
                                     &narrow_rows<V, 5>, &narrow_rows<V, 6>, &narrow_rows<V, 7>, &narrow_rows<V, 8>};
  index_t full = count / W;
  for (index_t c0 = 0; full > 0;) {  // at most 8 vectors at a time (64 columns at W = 8)
    const index_t regs = std::min<index_t>(full, 8);
    by_regs[regs](rows, count, d, alpha, A, lda, Bt + c0, C + c0, ldc);
    c0 += regs * W;
    full -= regs;
  }
  for (index_t j = count / W * W; j < count; ++j)
    for (index_t i = 0; i < rows; ++i) {
      const float* a = A + i * lda;
      float sum = 0.0f;
      for (index_t t = 0; t < d; ++t) sum += a[t] * Bt[t * count + j];
      C[i * ldc + j] = alpha * sum;
    }
}

// Rows i0 .. i0 + RB - 1 of C += P V over NR whole vectors of C's columns (starting at col).
template <class V, int NR, int RB>
void weighted_block(index_t count, const float* P, index_t ldp, const float* Vm, index_t ldv, float* C,
                    index_t ldc) {
  constexpr index_t W = V::width;
  typename V::reg acc[RB][NR];
  for (int q = 0; q < RB; ++q)
    for (int r = 0; r < NR; ++r) acc[q][r] = V::load(C + q * ldc + r * W);
  for (index_t j = 0; j < count; ++j) {
    typename V::reg v[NR];
    for (int r = 0; r < NR; ++r) v[r] = V::load(Vm + j * ldv + r * W);
    for (int q = 0; q < RB; ++q) {
      const auto p = V::set1(P[q * ldp + j]);
      for (int r = 0; r < NR; ++r) acc[q][r] = V::fmadd(p, v[r], acc[q][r]);
    }
  }
  for (int q = 0; q < RB; ++q)
    for (int r = 0; r < NR; ++r) V::store(C + q * ldc + r * W, acc[q][r]);
}

template <class V, int NR>
void weighted_rows(index_t rows, index_t count, const float* P, index_t ldp, const float* Vm, index_t ldv,
                   float* C, index_t ldc) {
  constexpr int RB = rows_per_block<NR>();
  index_t i = 0;
  for (; i + RB <= rows; i += RB) weighted_block<V, NR, RB>(count, P + i * ldp, ldp, Vm, ldv, C + i * ldc, ldc);
  for (; i < rows; ++i) weighted_block<V, NR, 1>(count, P + i * ldp, ldp, Vm, ldv, C + i * ldc, ldc);
}

template <class V>
void narrow_weighted_sum(index_t rows, index_t count, index_t dv, const float* P, index_t ldp,
                         const float* Vm, index_t ldv, float* C, index_t ldc) {
  constexpr index_t W = V::width;
  using Rows = void (*)(index_t, index_t, const float*, index_t, const float*, index_t, float*, index_t);
  static constexpr Rows by_regs[] = {nullptr,
                                     &weighted_rows<V, 1>, &weighted_rows<V, 2>, &weighted_rows<V, 3>, &weighted_rows<V, 4>,
                                     &weighted_rows<V, 5>, &weighted_rows<V, 6>, &weighted_rows<V, 7>, &weighted_rows<V, 8>};
  index_t full = dv / W;
  for (index_t c0 = 0; full > 0;) {
    const index_t regs = std::min<index_t>(full, 8);
    by_regs[regs](rows, count, P, ldp, Vm + c0, ldv, C + c0, ldc);
    c0 += regs * W;
    full -= regs;
  }
  for (index_t col = dv / W * W; col < dv; ++col)
    for (index_t i = 0; i < rows; ++i) {
      float sum = C[i * ldc + col];
      for (index_t j = 0; j < count; ++j) sum += P[i * ldp + j] * Vm[j * ldv + col];
      C[i * ldc + col] = sum;
    }
}

// Rows i .. i + RB - 1 of C from column j0, NR float64 vectors wide: RB x NR accumulators over
// the rows of Y in order.
template <class D, int RB, int NR>
void gram_tile(index_t rows, index_t d, const double* Y, index_t i, index_t j0, double beta, double* C) {
  constexpr index_t W = D::width;
  typename D::reg acc[RB][NR];
  for (int q = 0; q < RB; ++q)
    for (int r = 0; r < NR; ++r) acc[q][r] = beta == 0.0 ? D::set1(0.0) : D::load(C + (i + q) * d + j0 + r * W);
  for (index_t s = 0; s < rows; ++s) {
    const double* y = Y + s * d;
    typename D::reg v[NR];
    for (int r = 0; r < NR; ++r) v[r] = D::load(y + j0 + r * W);
    for (int q = 0; q < RB; ++q) {
      const auto a = D::set1(y[i + q]);
      for (int r = 0; r < NR; ++r) acc[q][r] = D::fmadd(a, v[r], acc[q][r]);
    }
  }
  for (int q = 0; q < RB; ++q)
    for (int r = 0; r < NR; ++r) D::store(C + (i + q) * d + j0 + r * W, acc[q][r]);
}

// One band of RB rows of C from the vector column holding the diagonal: tiles of 2 vectors,
// then of 1.
template <class D, int RB>
void gram_band(index_t rows, index_t d, const double* Y, index_t i, double beta, double* C) {
  constexpr index_t W = D::width;
  const index_t whole = d / W * W;
  index_t j = i / W * W;
  for (; j + 2 * W <= whole; j += 2 * W) gram_tile<D, RB, 2>(rows, d, Y, i, j, beta, C);
  for (; j + W <= whole; j += W) gram_tile<D, RB, 1>(rows, d, Y, i, j, beta, C);
}

// C <- beta C + Y^T Y (the upper triangle, and some entries below it that callers ignore): bands
// of 4 rows of C (8 independent accumulators per tile), columns past the last whole vector lane
// by lane.
template <class D>
void gram_update(index_t rows, index_t d, const double* Y, double beta, double* C) {
  constexpr index_t W = D::width;
  const index_t whole = d / W * W;
  index_t i = 0;
  for (; i + 4 <= d; i += 4) gram_band<D, 4>(rows, d, Y, i, beta, C);
  for (; i < d; ++i) gram_band<D, 1>(rows, d, Y, i, beta, C);
  for (index_t q = 0; q < d; ++q)
    for (index_t c = std::max(whole, q); c < d; ++c) {
      double sum = beta == 0.0 ? 0.0 : C[q * d + c];
      for (index_t s = 0; s < rows; ++s) sum += Y[s * d + q] * Y[s * d + c];
      C[q * d + c] = sum;
    }
}

template <class V>
bool softmax_update(float* tile, index_t rows, index_t c, float* m, double* l, float* acc, index_t dv) {
  bool any = false;
  for (index_t r = 0; r < rows; ++r) {
    float* s = tile + r * c;
    const float tmax = row_max<V>(s, c);
    if (tmax == -kInf) {  // every key masked
      for (index_t j = 0; j < c; ++j) s[j] = 0.0f;
      continue;
    }
    const float mnew = m[r] > tmax ? m[r] : tmax;
    const float corr = m[r] == -kInf ? 0.0f : std::exp(m[r] - mnew);
    const float tsum = exp_shift_sum<V>(s, c, mnew);
    l[r] = l[r] * corr + tsum;
    if (corr != 1.0f) {
      float* o = acc + r * dv;
      for (index_t j = 0; j < dv; ++j) o[j] *= corr;
    }
    m[r] = mnew;
    any = true;
  }
  return any;
}

// Lane counts are kept in float, exact below 2^24: chunks of 2^20 entries keep them there.
constexpr index_t kCountChunk = index_t(1) << 20;

template <class V>
index_t count_at_least(const float* x, index_t n, float t) {
  constexpr index_t W = V::width;
  const auto tv = V::set1(t), zero = V::set1(0.0f), one = V::set1(1.0f);
  index_t total = 0;
  for (index_t c0 = 0; c0 < n; c0 += kCountChunk) {
    const index_t c1 = std::min(n, c0 + kCountChunk);
    auto a0 = zero, a1 = zero;
    index_t j = c0;
    for (; j + 2 * W <= c1; j += 2 * W) {
      a0 = V::add(a0, V::select_lt(V::load(x + j), tv, zero, one));
      a1 = V::add(a1, V::select_lt(V::load(x + j + W), tv, zero, one));
    }
    for (; j + W <= c1; j += W) a0 = V::add(a0, V::select_lt(V::load(x + j), tv, zero, one));
    total += static_cast<index_t>(V::hsum(V::add(a0, a1)));
    for (; j < c1; ++j) total += !(x[j] < t);
  }
  return total;
}

// Each vector's entries in the window come from its comparison mask, one bit per entry: the window
// holds few of the entries.
template <class V>
index_t collect_between(const float* x, index_t n, float lo, float hi, float* out) {
  constexpr index_t W = V::width;
  const auto lv = V::set1(lo), hv = V::set1(hi);
  index_t m = 0, j = 0;
  for (; j + W <= n; j += W)
    for (unsigned bits = V::mask_between(V::load(x + j), lv, hv); bits != 0; bits &= bits - 1)
      out[m++] = x[j + std::countr_zero(bits)];
  for (; j < n; ++j)
    if (x[j] >= lo && x[j] < hi) out[m++] = x[j];
  return m;
}

// Four vectors with no entry above t are passed over with one test: a top-k scan's threshold soon
// stands above almost every logit of a row, so few blocks have set bits to walk.
template <class V>
index_t indices_above(const float* x, index_t n, float t, index_t* out) {
  constexpr index_t W = V::width;
  const auto tv = V::set1(t);
  index_t m = 0, j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    const auto a = V::max(V::max(V::load(x + j), V::load(x + j + W)), V::max(V::load(x + j + 2 * W), V::load(x + j + 3 * W)));
    if (!V::any_above(a, tv)) continue;
    for (index_t b = j; b < j + 4 * W; b += W)
      for (unsigned bits = V::mask_above(V::load(x + b), tv); bits != 0; bits &= bits - 1)
        out[m++] = b + std::countr_zero(bits);
  }
  for (; j < n; ++j)
    if (x[j] > t) out[m++] = j;
  return m;
}

// Columns x0 .. x0 + B W - 1 of the weighted sum, B accumulators (independent chains).
template <class V, int B>
void gathered_columns(const float* w, const index_t* idx, index_t m, const float* rows, index_t ld, index_t x0,
                      float* acc) {
  constexpr index_t W = V::width;
  typename V::reg a[B];
  for (int b = 0; b < B; ++b) a[b] = V::load(acc + x0 + b * W);
  for (index_t i = 0; i < m; ++i) {
    const auto wi = V::set1(w[i]);
    const float* row = rows + idx[i] * ld + x0;
    for (int b = 0; b < B; ++b) a[b] = V::fmadd(wi, V::load(row + b * W), a[b]);
  }
  for (int b = 0; b < B; ++b) V::store(acc + x0 + b * W, a[b]);
}

template <class V>
void gathered_weighted_sum(const float* w, const index_t* idx, index_t m, const float* rows, index_t ld, index_t dv,
                           float* acc) {
  constexpr index_t W = V::width;
  index_t x = 0;
  // Up to 64 columns per pass (8 AVX2 or 4 AVX-512 registers): each row read once.
  constexpr int B = W >= 16 ? 4 : 8;
  for (; x + B * W <= dv; x += B * W) gathered_columns<V, B>(w, idx, m, rows, ld, x, acc);
  for (; x + 4 * W <= dv; x += 4 * W) gathered_columns<V, 4>(w, idx, m, rows, ld, x, acc);
  for (; x + W <= dv; x += W) gathered_columns<V, 1>(w, idx, m, rows, ld, x, acc);
  for (; x < dv; ++x) gathered_columns<Scalar, 1>(w, idx, m, rows, ld, x, acc);
}

template <class V>
void gathered_dots(const float* x, const index_t* idx, index_t m, const float* rows, index_t ld, index_t d,
                   float alpha, float* out) {
  constexpr index_t W = V::width;
  for (index_t a = 0; a < m; ++a) {
    const float* row = rows + idx[a] * ld;
    auto s0 = V::set1(0.0f), s1 = V::set1(0.0f);
    index_t j = 0;
    for (; j + 2 * W <= d; j += 2 * W) {
      s0 = V::fmadd(V::load(x + j), V::load(row + j), s0);
      s1 = V::fmadd(V::load(x + j + W), V::load(row + j + W), s1);
    }
    for (; j + W <= d; j += W) s0 = V::fmadd(V::load(x + j), V::load(row + j), s0);
    float sum = V::hsum(V::add(s0, s1));
    for (; j < d; ++j) sum += x[j] * row[j];
    out[a] = alpha * sum;
  }
}

template <class V>
void scatter_scaled(const float* w, const index_t* idx, index_t m, const float* y, float* rows, index_t ld,
                    index_t d) {
  constexpr index_t W = V::width;
  for (index_t a = 0; a < m; ++a) {
    float* row = rows + idx[a] * ld;
    const auto wa = V::set1(w[a]);
    index_t j = 0;
    for (; j + W <= d; j += W) V::store(row + j, V::fmadd(wa, V::load(y + j), V::load(row + j)));
    for (; j < d; ++j) row[j] += w[a] * y[j];
  }
}

template <class V, class D>
constexpr RowOps make_row_ops(Isa isa) {
  RowOps ops;
  ops.isa = isa;
  ops.row_max = &row_max<V>;
  ops.exp_shift_sum = &exp_shift_sum<V>;
  ops.abs_row_max = &abs_row_max<V>;
  ops.power_rel_sum = &power_rel_sum<V>;
  ops.max_abs = &max_abs<V>;
  ops.widen = &widen<V>;
  ops.argmax_shifted = &argmax_shifted<V>;
  ops.weight_grads = &weight_grads<V>;
  ops.gathered_dots = &gathered_dots<V>;
  ops.scatter_scaled = &scatter_scaled<V>;
  ops.count_at_least = &count_at_least<V>;
  ops.collect_between = &collect_between<V>;
  ops.indices_above = &indices_above<V>;
  ops.gathered_weighted_sum = &gathered_weighted_sum<V>;
  ops.softmax_update = &softmax_update<V>;
  ops.narrow_logits = &narrow_logits<V>;
  ops.narrow_weighted_sum = &narrow_weighted_sum<V>;
  ops.gram_update = &gram_update<D>;
  return ops;
}

}  // namespace
}  // namespace levattn::kernels
