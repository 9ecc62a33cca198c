// kernels/elementwise_impl.hpp: the row operations of elementwise.hpp written once over the
// vector traits of simd.hpp. Each elementwise_<isa>.cpp includes this with its own compiler
// flags and instantiates it for its traits; the anonymous namespace keeps the copies apart.
#pragma once
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

template <class V>
constexpr RowOps make_row_ops(Isa isa) {
  RowOps ops;
  ops.isa = isa;
  ops.row_max = &row_max<V>;
  ops.exp_shift_sum = &exp_shift_sum<V>;
  ops.abs_row_max = &abs_row_max<V>;
  ops.power_rel_sum = &power_rel_sum<V>;
  return ops;
}

}  // namespace
}  // namespace levattn::kernels
