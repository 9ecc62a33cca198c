// The attention engine's tiles: what its forward (selected_attention.cpp) and its backward
// (selected_attention_backward.cpp) share. A call's context (shape, selection, kernel, inputs),
// its query tiles, which never straddle a segment of the selection, the blocks of keys a tile
// meets (shared keys gathered, the window band masked, or every key), the per-thread buffers and
// the BLAS logits of the float64 reference and of the backward.
#pragma once
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "detail/blas.hpp"
#include "detail/validate.hpp"
#include "kernels/elementwise.hpp"
#include "levattn/selected_attention.hpp"
#include "selectors.hpp"

namespace levattn::engine {

constexpr index_t kRows = 128;  // queries per tile (BLAS paths)
constexpr index_t kCols = 256;  // keys per block (BLAS paths)
// The float32 engine's tiles are kernels::kQueryBlock x kernels::kKeyTile. Tiles never straddle
// a segment of the selection (Ctx::tile), whatever its length.

// g(s) and g'(s) of the kernel: the weight of a key is exp(g(s) - L).
template <class T>
struct Fn {
  bool power = false;
  T p = 2, scale = 1;
  T g(T s) const { return !power ? s : s == 0 ? -std::numeric_limits<T>::infinity() : p * std::log(std::fabs(s)); }
  T dg(T s) const { return !power ? T(1) : s == 0 ? T(0) : p / s; }
};

template <class T>
Fn<T> make_fn(const KernelOptions& o, index_t d) {
  detail::check_kernel(o);
  Fn<T> f;
  f.power = o.kernel == Kernel::power;
  f.p = static_cast<T>(o.p);
  f.scale = static_cast<T>(logit_scale(o, d));
  return f;
}

// x[j] <- exp(x[j] - shift), returns the sum (the float64 reference; float32 runs on the ISA kernels).
inline double exp_rows(double* x, index_t c, double shift) {
  double sum = 0.0;
  for (index_t j = 0; j < c; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

// Whether x[0 .. n) are all finite.
template <class T>
bool finite(const T* x, index_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return detail::all_finite(x, n);
  } else {
    bool ok = true;
    for (index_t j = 0; j < n; ++j) ok &= std::isfinite(x[j]);
    return ok;
  }
}

// The row operations of the engine's loops in T, with the formulas of kernels/elementwise.hpp:
// for float32 the active ISA's kernels, for the float64 reference plain loops.
template <class T>
struct RowKernels;

template <>
struct RowKernels<float> {
  const kernels::RowOps& ops = kernels::active_row_ops();
  void weight_grads(const float* s, float* p, float* dp, index_t n, float L, float power, float delta) const {
    ops.weight_grads(s, p, dp, n, L, power, delta);
  }
  void dots(const float* x, const index_t* idx, index_t m, const float* rows, index_t d, float alpha,
            float* out) const {
    ops.gathered_dots(x, idx, m, rows, d, d, alpha, out);
  }
  void weighted_sum(const float* w, const index_t* idx, index_t m, const float* rows, index_t d, float* acc) const {
    ops.gathered_weighted_sum(w, idx, m, rows, d, d, acc);
  }
  void scatter(const float* w, const index_t* idx, index_t m, const float* y, float* rows, index_t d) const {
    ops.scatter_scaled(w, idx, m, y, rows, d, d);
  }
};

template <>
struct RowKernels<double> {
  static void weight_grads(const double* s, double* p, double* dp, index_t n, double L, double power, double delta) {
    for (index_t j = 0; j < n; ++j) {
      const double x = s[j];
      const bool none = x == -std::numeric_limits<double>::infinity() || (power > 0.0 && x == 0.0);
      p[j] = none ? 0.0 : std::exp((power > 0.0 ? power * std::log(std::fabs(x)) : x) - L);
      dp[j] = p[j] == 0.0 ? 0.0 : p[j] * (power > 0.0 ? power / x : 1.0) * (dp[j] - delta);
    }
  }
  static void dots(const double* x, const index_t* idx, index_t m, const double* rows, index_t d, double alpha,
                   double* out) {
    for (index_t a = 0; a < m; ++a) {
      double sum = 0.0;
      for (index_t j = 0; j < d; ++j) sum += x[j] * rows[idx[a] * d + j];
      out[a] = alpha * sum;
    }
  }
  static void weighted_sum(const double* w, const index_t* idx, index_t m, const double* rows, index_t d,
                           double* acc) {
    for (index_t a = 0; a < m; ++a)
      for (index_t x = 0; x < d; ++x) acc[x] += w[a] * rows[idx[a] * d + x];
  }
  static void scatter(const double* w, const index_t* idx, index_t m, const double* y, double* rows, index_t d) {
    for (index_t a = 0; a < m; ++a)
      for (index_t x = 0; x < d; ++x) rows[idx[a] * d + x] += w[a] * y[x];
  }
};

/// Throws unless `sh` is a well-formed, non-empty shape whose sizes fit.
void check_shape(const AttentionShape& sh);

/// Throws unless `sel` is one well-formed selection for `sh`.
void check_selection(const AttentionShape& sh, const Selection& sel);

/// Throws Error(invalid_argument): `what` overflow the floating-point type.
[[noreturn]] void overflow(const char* what);

// What both directions share: sizes, kernel, inputs and the selection's segments.
template <class T>
struct Ctx {
  AttentionShape sh;
  const Selection& sel;
  Fn<T> fn;
  const T *q, *k, *v;
  index_t tile_rows = kRows;  // queries per tile

  const T* Q(index_t h) const { return q + h * sh.m * sh.d; }
  const T* K(index_t h) const { return k + sh.kv_pair(h) * sh.n * sh.d; }
  const T* V(index_t h) const { return v + sh.kv_pair(h) * sh.n * sh.dv; }
  index_t seg_len() const { return sel.segment > 0 ? sel.segment : sh.m; }
  // The shared set of segment s of pair h (queries s seg_len() ..).
  const std::vector<index_t>& shared(index_t h, index_t s) const { return sel.shared_of(h, s * seg_len()); }
  // Query tiles never straddle a segment: tiles_per_segment() of them per segment.
  index_t tiles_per_segment() const { return (seg_len() + tile_rows - 1) / tile_rows; }
  index_t tiles() const { return sel.segments() * tiles_per_segment(); }
  // Tile t of a pair: its first query and row count (0 rows past the last query).
  std::pair<index_t, index_t> tile(index_t t) const {
    const index_t seg = t / tiles_per_segment(), i0 = seg * seg_len() + (t % tiles_per_segment()) * tile_rows;
    const index_t end = std::min(sh.m, (seg + 1) * seg_len());
    return {i0, std::max<index_t>(0, std::min(tile_rows, end - i0))};
  }
  // Keys a query attends (for the work estimate).
  double keys_per_query() const {
    const double half = sel.causal ? 0.5 : 1.0;
    if (sel.all_keys) return half * static_cast<double>(sh.n);
    double u = 0.0;
    for (const auto& s : sel.shared_keys) u += static_cast<double>(s.size());
    const double band = sel.window >= 0 ? 2.0 * half * static_cast<double>(sel.window) + 1.0 : 0.0;
    return half * u / static_cast<double>(sel.pairs() * sel.segments()) + band +
           static_cast<double>(sel.top_k + sel.residual);
  }
  double flops() const {
    return 4.0 * static_cast<double>(sel.pairs()) * static_cast<double>(sh.m) * keys_per_query() *
           static_cast<double>(sh.d + sh.dv);
  }
};

// The context of one call, its shape, selection and inputs checked (finite inputs: by the caller).
template <class T>
Ctx<T> checked_ctx(const AttentionShape& sh, const Selection& sel, const KernelOptions& o, const T* q,
                   const T* k, const T* v) {
  check_shape(sh);
  check_selection(sh, sel);
  LEVATTN_REQUIRE(q && k && v, "attention", "null data pointer for queries, keys or values");
  return Ctx<T>{sh, sel, make_fn<T>(o, sh.d), q, k, v};
}

template <class T>
Ctx<T> make_ctx(const AttentionShape& sh, const Selection& sel, const KernelOptions& o, const T* q,
                const T* k, const T* v) {
  const Ctx<T> c = checked_ctx(sh, sel, o, q, k, v);
  const index_t pairs = sel.pairs();
  LEVATTN_REQUIRE(finite(q, pairs * sh.m * sh.d), "queries", "expected finite values (found NaN or Inf)");
  const index_t kv_pairs = sh.batch * sh.kv();
  LEVATTN_REQUIRE(finite(k, kv_pairs * sh.n * sh.d), "keys", "expected finite values (found NaN or Inf)");
  LEVATTN_REQUIRE(finite(v, kv_pairs * sh.n * sh.dv), "values", "expected finite values (found NaN or Inf)");
  return c;
}

// A block of keys met by a query tile: c keys, rows of kb / vb. Shared keys are gathered
// (keys: their indices); other blocks are contiguous from key j0, a window band's (band) masked
// per query to its window minus its shared set.
template <class T>
struct Block {
  const T *kb, *vb;
  index_t c;
  const index_t* keys;  // gathered shared keys, else nullptr
  index_t j0;
  bool band;
};

// Per-thread buffers of one tile: logits, weights and their gradients, accumulators, gathered
// shared keys (and a band's membership flags), and one query's own keys (indices, logits, g).
template <class T>
struct Workspace {
  std::vector<T> s, p, ds, acc, gk, gv;
  std::vector<char> flags;
  std::vector<double> l;
  std::vector<T> mx;
  std::vector<index_t> own;
  std::vector<T> os, og, op;  // one query's own keys: logits, g or weights, dP or dS
  // The backward's current shared set, gathered once for the tiles of a chunk that meet it
  // (set_k, set_v), and its keys' dK and dV summed over those tiles (set_dk, set_dv; rows 0 ..
  // set_used - 1 written), in the set's order until the chunk leaves it.
  const std::vector<index_t>* set = nullptr;
  index_t set_used = 0;
  std::vector<T> set_k, set_v, set_dk, set_dv;
  std::vector<index_t> row_of;  // a chunk's key-to-row map of its partial buffers (KeyRows)
  std::vector<index_t> slot_of;  // mask_sampled's scratch (n entries of -1; empty if not needed)
  std::vector<T> sdk, sdv;       // a block of sampled keys' dK and dV before they are added to their rows
  Workspace(const AttentionShape& sh, index_t top_k)
      : s(kRows * kCols), p(kRows * kCols), ds(kRows * kCols), acc(static_cast<std::size_t>(kRows * sh.dv)),
        gk(static_cast<std::size_t>(kCols * sh.d)), gv(static_cast<std::size_t>(kCols * sh.dv)), flags(kCols),
        l(kRows), mx(kRows),
        own(static_cast<std::size_t>(top_k)), os(own.size()), og(own.size()), op(own.size()) {}
  Workspace(const AttentionShape& sh, const Selection& sel) : Workspace(sh, sel.top_k) {
    if (sel.residual > 0 && sel.top_k > 0) slot_of.assign(static_cast<std::size_t>(sh.n), -1);
  }
};

constexpr auto kNo = CblasNoTrans;
constexpr auto kTr = CblasTrans;

// Keys keys[0 .. count) of pair h gathered into gk / gv (count rows of d and dv), as a block.
template <class T>
Block<T> gather(const Ctx<T>& c, T* gk, T* gv, index_t h, const index_t* keys, index_t count) {
  const index_t d = c.sh.d, dv = c.sh.dv;
  for (index_t a = 0; a < count; ++a) {
    std::copy_n(c.K(h) + keys[a] * d, d, gk + a * d);
    std::copy_n(c.V(h) + keys[a] * dv, dv, gv + a * dv);
  }
  return Block<T>{gk, gv, count, keys, 0, false};
}
template <class T>
Block<T> gather(const Ctx<T>& c, Workspace<T>& ws, index_t h, const index_t* keys, index_t count) {
  return gather(c, ws.gk.data(), ws.gv.data(), h, keys, count);
}

// Calls f(block) for each block of at most `width` keys that queries i0 .. i0 + rows - 1 of pair
// h attend (one segment's queries): every key, or the segment's shared set (gathered into gk, gv;
// `gathered`: gk and gv already hold the whole set) then the window band; causal stops at the
// tile's last query.
template <class T, class F>
void for_each_block(const Ctx<T>& c, T* gk, T* gv, index_t width, index_t h, index_t i0, index_t rows, F&& f,
                    bool gathered = false) {
  const index_t d = c.sh.d, dv = c.sh.dv, last = i0 + rows - 1;
  if (c.sel.all_keys) {
    const index_t j1 = c.sel.causal ? std::min(c.sh.n, last + 1) : c.sh.n;
    for (index_t j0 = 0; j0 < j1; j0 += width)
      f(Block<T>{c.K(h) + j0 * d, c.V(h) + j0 * dv, std::min(width, j1 - j0), nullptr, j0, false});
    return;
  }
  const auto& keys = c.sel.shared_of(h, i0);
  const index_t u = c.sel.causal ? std::upper_bound(keys.begin(), keys.end(), last) - keys.begin()
                                 : static_cast<index_t>(keys.size());
  for (index_t a0 = 0; a0 < u; a0 += width) {
    const index_t count = std::min(width, u - a0);
    f(gathered ? Block<T>{gk + a0 * d, gv + a0 * dv, count, keys.data() + a0, 0, false}
               : gather(c, gk, gv, h, keys.data() + a0, count));
  }
  const index_t w = c.sel.window;
  if (w < 0) return;
  index_t lo = std::max<index_t>(0, i0 - w), hi = std::min(c.sh.n, c.sel.causal ? last + 1 : last + 1 + w);
  // Shared keys at the band's ends need no logits (a causal set holds its segment's own keys).
  const auto shared = [&](index_t j) { return std::binary_search(keys.begin(), keys.end(), j); };
  while (hi > lo && shared(hi - 1)) --hi;
  while (lo < hi && shared(lo)) ++lo;
  for (index_t j0 = lo; j0 < hi; j0 += width)
    f(Block<T>{c.K(h) + j0 * d, c.V(h) + j0 * dv, std::min(width, hi - j0), nullptr, j0, true});
}
template <class T, class F>
void for_each_block(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, F&& f) {
  for_each_block(c, ws.gk.data(), ws.gv.data(), kCols, h, i0, rows, std::forward<F>(f));
}

// g (rows x b.c, leading dimension b.c) <- -inf where the selection masks a key of block b for
// queries i0 .. of pair h: after query i (causal), or, in a window band, outside i's window or in
// its shared set (flags: b.c bytes of scratch), or (key padding) in a contiguous block, a key the
// selection's key_mask closes (gathered keys never are).
template <class T>
void mask_block(const Ctx<T>& c, char* flags, index_t h, index_t i0, index_t rows, const Block<T>& b, T* g_tile) {
  const index_t w = c.sel.window;
  const bool causal = c.sel.causal;
  constexpr T none = -std::numeric_limits<T>::infinity();
  const bool shared_in_band = b.band && !c.sel.shared_of(h, i0).empty();
  if (shared_in_band) detail::mark_members(c.sel.shared_of(h, i0), b.j0, b.c, flags);
  const std::uint8_t* open = !b.keys && !c.sel.key_mask.empty() ? c.sel.key_mask.data() + h / c.sh.heads * c.sh.n + b.j0
                                                                 : nullptr;
  if (!b.band && !open && !causal) return;
  // Gathered keys ascend: a block before the tile's first query hides nothing from any row.
  if (causal && b.keys && !open && b.keys[b.c - 1] <= i0) return;
  for (index_t r = 0; r < rows; ++r) {
    T* g = g_tile + r * b.c;
    if (open)
      for (index_t a = 0; a < b.c; ++a)
        if (!open[a]) g[a] = none;
    const index_t i = i0 + r;
    if (b.band) {  // open: keys i - w .. i (causal) or i + w, less the shared ones
      const index_t lo = std::clamp<index_t>(i - w - b.j0, 0, b.c);
      const index_t hi = std::clamp<index_t>((causal ? i : i + w) + 1 - b.j0, lo, b.c);
      std::fill(g, g + lo, none);
      std::fill(g + hi, g + b.c, none);
      if (shared_in_band)
        for (index_t a = lo; a < hi; ++a)
          if (flags[a]) g[a] = none;
    } else if (causal && b.keys) {
      std::fill(g + (std::upper_bound(b.keys, b.keys + b.c, i) - b.keys), g + b.c, none);
    } else if (causal) {
      for (index_t a = std::max<index_t>(0, i + 1 - b.j0); a < b.c; ++a) g[a] = none;
    }
  }
}

// ws.s <- scale Q_tile K_b^T (the power kernel only: softmax's g is the identity); ws.p <- g(s),
// -inf where the selection masks a key (mask_block).
template <class T>
void logits(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const Block<T>& b) {
  detail::gemm(kNo, kTr, rows, b.c, c.sh.d, c.fn.scale, c.Q(h) + i0 * c.sh.d, c.sh.d, b.kb, c.sh.d, T(0),
               c.fn.power ? ws.s.data() : ws.p.data(), b.c);
  if (c.fn.power)
    for (index_t e = 0; e < rows * b.c; ++e) ws.p[e] = c.fn.g(ws.s[e]);
  mask_block(c, ws.flags.data(), h, i0, rows, b, ws.p.data());
}

// Query i of pair h's own keys (slots of -1 skipped) into ws.own; returns how many.
template <class T>
index_t own_keys(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i) {
  const index_t* slots = c.sel.query_keys.data() + (h * c.sh.m + i) * c.sel.top_k;
  return std::copy_if(slots, slots + c.sel.top_k, ws.own.begin(), [](index_t j) { return j >= 0; }) - ws.own.begin();
}

// The sampled keys (ascending) that queries i0 .. i0 + rows - 1 of pair h may attend: their
// residual block's (one block: tiles never straddle one), up to the tile's last query if causal.
// Returns a pointer to them and sets count; none without a residual part.
template <class T>
const index_t* sampled_keys(const Ctx<T>& c, index_t h, index_t i0, index_t rows, index_t& count) {
  count = 0;
  const index_t r = c.sel.residual;
  if (r == 0) return nullptr;
  const index_t b = c.sel.residual_block(i0);
  if (b != c.sel.residual_block(i0 + rows - 1))
    detail::fail(ErrorKind::internal, "attention", "a query tile straddles two residual blocks");
  const index_t* keys = c.sel.residual_keys.data() + (h * c.sel.residual_blocks() + b) * r;
  const index_t* end = std::lower_bound(keys, keys + r, 0, [](index_t j, index_t) { return j >= 0; });
  if (c.sel.causal) end = std::upper_bound(keys, end, i0 + rows - 1);
  count = static_cast<index_t>(end - keys);
  return keys;
}

// The log of the weight of the sampled keys of query i0's residual block, added to their g.
template <class T>
T sampled_log_weight(const Ctx<T>& c, index_t h, index_t i0) {
  return static_cast<T>(std::log(c.sel.residual_weight[static_cast<std::size_t>(h * c.sel.residual_blocks() +
                                                                                  c.sel.residual_block(i0))]));
}

// Calls f(block) for each block of at most `width` of the sampled keys of queries i0 .. i0 + rows
// - 1 of pair h (sampled_keys), gathered into gk and gv.
template <class T, class F>
void for_each_sampled(const Ctx<T>& c, T* gk, T* gv, index_t width, index_t h, index_t i0, index_t rows, F&& f) {
  index_t count = 0;
  const index_t* keys = sampled_keys(c, h, i0, rows, count);
  for (index_t a0 = 0; a0 < count; a0 += width) f(gather(c, gk, gv, h, keys + a0, std::min(width, count - a0)));
}

// g (rows x b.c) <- -inf where a query of rows i0 .. of pair h gets a sampled key of block b
// (ascending, gathered) through another part: its window band or its own keys (slot_of: n
// entries of -1, used as scratch and left so). The causal cut is mask_block's.
template <class T>
void mask_sampled(const Ctx<T>& c, index_t* slot_of, index_t h, index_t i0, index_t rows, const Block<T>& b, T* g_tile) {
  const index_t w = c.sel.window, kk = c.sel.top_k;
  if (w < 0 && kk == 0) return;
  constexpr T none = -std::numeric_limits<T>::infinity();
  const index_t* keys = b.keys;
  for (index_t a = 0; a < b.c && kk > 0; ++a) slot_of[keys[a]] = a;
  for (index_t r = 0; r < rows; ++r) {
    const index_t i = i0 + r;
    T* g = g_tile + r * b.c;
    if (w >= 0)
      std::fill(g + (std::lower_bound(keys, keys + b.c, i - w) - keys),
                g + (std::upper_bound(keys, keys + b.c, c.sel.causal ? i : i + w) - keys), none);
    const index_t* own = c.sel.query_keys.data() + (h * c.sh.m + i) * kk;
    for (index_t a = 0; a < kk; ++a)
      if (own[a] >= 0 && slot_of[own[a]] >= 0) g[slot_of[own[a]]] = none;
  }
  for (index_t a = 0; a < b.c && kk > 0; ++a) slot_of[keys[a]] = -1;
}

}  // namespace levattn::engine
