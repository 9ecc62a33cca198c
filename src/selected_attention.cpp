// The attention engine: attention over a fixed selection and its gradients. Each query tile
// meets its keys as blocks (shared keys gathered, the window band masked, or every key), then
// each query its own keys; the forward runs an online log-sum-exp over all of them, the backward
// recomputes the weights from the saved row statistics. The float32 forward runs on the ISA row
// kernels (kernels::OnlineBlock); the float64 forward and both backwards on BLAS products, the
// float64 forward serving as the reference. dQ is summed per query tile, dK and dV per key block
// and then per key over its own-key entries, each in a fixed order.
#include "levattn/selected_attention.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "selectors.hpp"
#include "detail/validate.hpp"
#include "engine.hpp"
#include "kernels/elementwise.hpp"
#include "kernels/online_attention.hpp"

namespace levattn {
namespace {

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

// x[j] <- exp(x[j] - shift), returns the sum (float: the vectorised kernel of the active ISA).
float exp_rows(float* x, index_t c, float shift) { return kernels::active_row_ops().exp_shift_sum(x, c, shift); }
double exp_rows(double* x, index_t c, double shift) {
  double sum = 0.0;
  for (index_t j = 0; j < c; ++j) sum += (x[j] = std::exp(x[j] - shift));
  return sum;
}

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

void check_shape(const AttentionShape& sh) {
  LEVATTN_REQUIRE(sh.batch >= 1 && sh.heads >= 1 && sh.m >= 1 && sh.n >= 1 && sh.d >= 1 && sh.dv >= 1, "attention",
                  "expected non-empty inputs, got (batch, heads) = (", sh.batch, ", ", sh.heads, "), ", sh.m,
                  " queries, ", sh.n, " keys, d = ", sh.d, ", dv = ", sh.dv);
  LEVATTN_REQUIRE(sh.kv_heads >= 0 && sh.heads % sh.kv() == 0, "attention", "the key/value heads (", sh.kv_heads,
                  ") must divide the query heads (", sh.heads, ")");
  const index_t pairs = checked_elements({sh.batch, sh.heads}, "attention (batch, heads)");
  checked_elements({pairs, std::max(sh.m, sh.n), std::max(sh.d, sh.dv)}, "attention inputs");
}

// Throws unless `sel` is one well-formed selection for `sh`.
void check_selection(const AttentionShape& sh, const Selection& sel) {
  LEVATTN_REQUIRE(sel.batch == sh.batch && sel.heads == sh.heads && sel.m == sh.m && sel.n == sh.n, "selection",
                  "made for (batch, heads) = (", sel.batch, ", ", sel.heads, "), ", sel.m, " queries and ", sel.n,
                  " keys, used with (", sh.batch, ", ", sh.heads, "), ", sh.m, " queries and ", sh.n, " keys");
  const index_t pairs = sel.pairs();
  LEVATTN_REQUIRE(sel.window >= -1, "selection", "window must be >= -1");
  LEVATTN_REQUIRE(sel.segment >= 0, "selection", "segment must be >= 0");
  LEVATTN_REQUIRE(!sel.all_keys || (sel.shared_keys.empty() && sel.window < 0 && sel.top_k == 0), "selection",
                  "all keys excludes shared keys, a window and per-query keys");
  LEVATTN_REQUIRE(sel.shared_keys.empty() || static_cast<index_t>(sel.shared_keys.size()) == pairs * sel.segments(),
                  "selection", "expected a shared key set per pair and segment (", pairs * sel.segments(),
                  ") or none, got ", sel.shared_keys.size());
  LEVATTN_REQUIRE(sel.key_mask.empty() || static_cast<index_t>(sel.key_mask.size()) == sel.batch * sel.n, "selection",
                  "the key mask must be (batch, n) or empty");
  for (std::size_t set = 0; set < sel.shared_keys.size(); ++set) {
    const auto& keys = sel.shared_keys[set];
    const index_t h = static_cast<index_t>(set) / sel.segments();
    for (std::size_t a = 0; a < keys.size(); ++a) {
      LEVATTN_REQUIRE(!(keys[a] < 0 || keys[a] >= sel.n || (a > 0 && keys[a] <= keys[a - 1])), "selection",
                      "shared keys must be ascending, distinct and in [0, n)");
      LEVATTN_REQUIRE(sel.key_open(h, keys[a]), "selection", "a shared set holds a masked key");
    }
  }
  if (sel.top_k == 0) {
    LEVATTN_REQUIRE(sel.query_keys.empty(), "selection", "per-query keys without a top_k");
    return;
  }
  LEVATTN_REQUIRE(sel.top_k >= 0 && sel.top_k <= sel.n &&
                      static_cast<index_t>(sel.query_keys.size()) == pairs * sel.m * sel.top_k,
                  "selection", "per-query keys must be (pairs, m, top_k) with 1 <= top_k <= n");
  // Each query's own keys: distinct, in range (or -1), causal if the selection is, and neither
  // in its shared set (marked per set: `shared` holds the set's number) nor in its window.
  std::vector<index_t> stamp(static_cast<std::size_t>(sel.n), -1), shared(stamp.size(), -1);
  for (index_t h = 0; h < pairs; ++h) {
    for (index_t i = 0; i < sel.m; ++i) {
      const index_t row = h * sel.m + i, set = h * sel.segments() + (sel.segment > 0 ? i / sel.segment : 0);
      if (!sel.shared_keys.empty() && (i == 0 || (sel.segment > 0 && i % sel.segment == 0)))
        for (index_t j : sel.shared_keys[set]) shared[j] = set;
      for (index_t a = 0; a < sel.top_k; ++a) {
        const index_t j = sel.query_keys[row * sel.top_k + a];
        if (j == -1) continue;
        LEVATTN_REQUIRE(j >= 0 && j < sel.n && stamp[j] != row, "selection",
                        "each query's keys must be distinct and in [0, n) (-1 for an unused slot)");
        LEVATTN_REQUIRE(!sel.causal || j <= i, "selection", "a causal query's own keys must not follow it");
        LEVATTN_REQUIRE(sel.key_open(h, j), "selection", "a query's own keys hold a masked key");
        LEVATTN_REQUIRE(!(shared[j] == set || (sel.window >= 0 && std::abs(i - j) <= sel.window)), "selection",
                        "a query's own keys must not repeat its shared keys or its window");
        stamp[j] = row;
      }
    }
  }
}

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
    return half * u / static_cast<double>(sel.pairs() * sel.segments()) + band + static_cast<double>(sel.top_k);
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
  std::vector<T> s, p, ds, acc, dkb, dvb, dkp, dvp, gk, gv;
  std::vector<char> flags;
  std::vector<double> l;
  std::vector<T> mx;
  std::vector<index_t> own;
  std::vector<T> os, og, op, kg, vg;  // own keys: logits, g, weights or dP, gathered K and V rows
  Workspace(const AttentionShape& sh, index_t top_k)
      : s(kRows * kCols), p(kRows * kCols), ds(kRows * kCols), acc(static_cast<std::size_t>(kRows * sh.dv)),
        dkb(static_cast<std::size_t>(kCols * sh.d)), dvb(static_cast<std::size_t>(kCols * sh.dv)), dkp(dkb.size()),
        dvp(dvb.size()), gk(dkb.size()), gv(dvb.size()), flags(kCols), l(kRows), mx(kRows),
        own(static_cast<std::size_t>(top_k)), os(own.size()), og(own.size()), op(own.size()),
        kg(static_cast<std::size_t>(top_k * sh.d)), vg(static_cast<std::size_t>(top_k * sh.dv)) {}
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
// h attend (one segment's queries): every key, or the segment's shared set (gathered into gk, gv)
// then the window band; causal stops at the tile's last query.
template <class T, class F>
void for_each_block(const Ctx<T>& c, T* gk, T* gv, index_t width, index_t h, index_t i0, index_t rows, F&& f) {
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
  for (index_t a0 = 0; a0 < u; a0 += width) f(gather(c, gk, gv, h, keys.data() + a0, std::min(width, u - a0)));
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
  if (b.band) detail::mark_members(c.sel.shared_of(h, i0), b.j0, b.c, flags);
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
    if (b.band) {
      const index_t hi = causal ? i : i + w;
      for (index_t a = 0; a < b.c; ++a) {
        const index_t j = b.j0 + a;
        if (j < i - w || j > hi || flags[a]) g[a] = none;
      }
    } else if (causal && b.keys) {
      std::fill(g + (std::upper_bound(b.keys, b.keys + b.c, i) - b.keys), g + b.c, none);
    } else if (causal) {
      for (index_t a = std::max<index_t>(0, i + 1 - b.j0); a < b.c; ++a) g[a] = none;
    }
  }
}

// ws.s <- scale Q_tile K_b^T; ws.p <- g(s), -inf where the selection masks a key (mask_block).
template <class T>
void logits(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const Block<T>& b) {
  detail::gemm(kNo, kTr, rows, b.c, c.sh.d, c.fn.scale, c.Q(h) + i0 * c.sh.d, c.sh.d, b.kb, c.sh.d, T(0),
               ws.s.data(), b.c);
  for (index_t e = 0; e < rows * b.c; ++e) ws.p[e] = c.fn.g(ws.s[e]);
  mask_block(c, ws.flags.data(), h, i0, rows, b, ws.p.data());
}

// Online log-sum-exp of one block into the tile's running maximum, sum and accumulator.
template <class T>
void absorb(const Ctx<T>& c, Workspace<T>& ws, index_t rows, const Block<T>& b) {
  const index_t dv = c.sh.dv;
  for (index_t r = 0; r < rows; ++r) {
    T* g = ws.p.data() + r * b.c;
    const T bm = *std::max_element(g, g + b.c);
    const T nm = std::max(ws.mx[r], bm);
    if (nm == -std::numeric_limits<T>::infinity()) {
      std::fill_n(g, b.c, T(0));
      continue;
    }
    if (ws.mx[r] != nm) {
      const T f = std::exp(ws.mx[r] - nm);
      ws.l[r] *= static_cast<double>(f);
      for (index_t x = 0; x < dv; ++x) ws.acc[r * dv + x] *= f;
      ws.mx[r] = nm;
    }
    ws.l[r] += static_cast<double>(exp_rows(g, b.c, nm));
  }
  detail::gemm(kNo, kNo, rows, dv, b.c, T(1), ws.p.data(), b.c, b.vb, dv, T(1), ws.acc.data(), dv);
}

template <class T>
void forward_tile(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, T* out, T* stat) {
  const index_t dv = c.sh.dv;
  std::fill_n(ws.mx.begin(), rows, -std::numeric_limits<T>::infinity());
  std::fill_n(ws.l.begin(), rows, 0.0);
  std::fill_n(ws.acc.begin(), rows * dv, T(0));
  for_each_block(c, ws, h, i0, rows, [&](const Block<T>& b) {
    logits(c, ws, h, i0, rows, b);
    absorb(c, ws, rows, b);
  });
  if (c.sel.top_k > 0)
    for (index_t r = 0; r < rows; ++r) absorb_own(c, ws, h, i0, r);
  for (index_t r = 0; r < rows; ++r) {
    T* o = out + (h * c.sh.m + i0 + r) * dv;
    const double l = ws.l[r];
    const bool empty = !(l > 0.0);
    for (index_t x = 0; x < dv; ++x) o[x] = empty ? T(0) : static_cast<T>(ws.acc[r * dv + x] / l);
    stat[h * c.sh.m + i0 + r] =
        empty ? std::numeric_limits<T>::infinity() : static_cast<T>(static_cast<double>(ws.mx[r]) + std::log(l));
  }
}

// Query i's own keys (slots of -1 skipped): their indices into ws.own, their K and V rows into
// ws.kg and ws.vg, their logits into ws.os and g(s) into ws.og; returns how many.
template <class T>
index_t own_logits(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i) {
  const index_t kk = c.sel.top_k, d = c.sh.d, dv = c.sh.dv;
  const index_t* keys = c.sel.query_keys.data() + (h * c.sh.m + i) * kk;
  index_t count = 0;
  for (index_t a = 0; a < kk; ++a) {
    if (keys[a] < 0) continue;
    ws.own[count] = keys[a];
    std::copy_n(c.K(h) + keys[a] * d, d, ws.kg.data() + count * d);
    std::copy_n(c.V(h) + keys[a] * dv, dv, ws.vg.data() + count * dv);
    ++count;
  }
  if (count == 0) return 0;
  detail::gemv(kNo, count, d, c.fn.scale, ws.kg.data(), d, c.Q(h) + i * d, T(0), ws.os.data());
  for (index_t a = 0; a < count; ++a) ws.og[a] = c.fn.g(ws.os[a]);
  return count;
}

// Row r's own keys into the tile's running maximum, sum and accumulator (after its blocks).
template <class T>
void absorb_own(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t r) {
  const index_t count = own_logits(c, ws, h, i0 + r), dv = c.sh.dv;
  if (count == 0) return;
  const T nm = std::max(ws.mx[r], *std::max_element(ws.og.begin(), ws.og.begin() + count));
  if (nm == -std::numeric_limits<T>::infinity()) return;
  T* acc = ws.acc.data() + r * dv;
  if (ws.mx[r] != nm) {
    const T f = std::exp(ws.mx[r] - nm);
    ws.l[r] *= static_cast<double>(f);
    for (index_t x = 0; x < dv; ++x) acc[x] *= f;
    ws.mx[r] = nm;
  }
  std::copy_n(ws.og.begin(), count, ws.op.begin());
  ws.l[r] += static_cast<double>(exp_rows(ws.op.data(), count, nm));
  detail::gemv(kTr, count, dv, T(1), ws.vg.data(), dv, ws.op.data(), T(1), acc);
}

// The float32 engine's per-thread state: the online block (up to a tile's rows, key tiles of up
// to kernels::kKeyTile), gathered shared key and value rows (only where the selection has shared
// sets), a window band's membership flags and one query's own keys. Sized to the call, and left
// uninitialised where every element is written before it is read: a decoding step attends one
// query over a few hundred keys, and zero-filling full-size buffers would cost more than that.
struct EngineWorkspace {
  kernels::OnlineBlock blk;
  std::unique_ptr<float[]> gk, gv;
  std::vector<char> flags;
  std::vector<index_t> own;  // one query's own keys, unused slots left out
  EngineWorkspace(const kernels::KernelParams& params, const Ctx<float>& c, index_t widest_set)
      : blk(params, std::min(c.tile_rows, c.sh.m), std::min(kernels::kKeyTile, c.sh.n), c.sh.dv),
        gk(new float[static_cast<std::size_t>(std::min(kernels::kKeyTile, widest_set) * c.sh.d)]),
        gv(new float[static_cast<std::size_t>(std::min(kernels::kKeyTile, widest_set) * c.sh.dv)]),
        flags(static_cast<std::size_t>(std::min(kernels::kKeyTile, c.sh.n))),
        own(static_cast<std::size_t>(c.sel.top_k)) {}
};

// Queries i0 .. i0 + rows - 1 of pair h in float32: their blocks of keys through the online
// block (logits, the selection's masks written into the logit tile, the online update), then
// each query's own keys; out and (unless null) stat rows written.
kernels::OnlineBlock::Rows engine_tile(const Ctx<float>& c, EngineWorkspace& ws, index_t h, index_t i0, index_t rows,
                                       float* out, float* stat) {
  const index_t d = c.sh.d, dv = c.sh.dv, kk = c.sel.top_k;
  ws.blk.begin(c.Q(h) + i0 * d, d, rows, d);
  for_each_block(c, ws.gk.get(), ws.gv.get(), kernels::kKeyTile, h, i0, rows, [&](const Block<float>& b) {
    float* tile = ws.blk.logits(b.kb, d, b.c);
    mask_block(c, ws.flags.data(), h, i0, rows, b, tile);
    ws.blk.absorb(b.vb, dv, b.c);
  });
  for (index_t r = 0; r < rows && kk > 0; ++r) {
    const index_t* slots = c.sel.query_keys.data() + (h * c.sh.m + i0 + r) * kk;
    const index_t count = std::copy_if(slots, slots + kk, ws.own.begin(), [](index_t j) { return j >= 0; }) - ws.own.begin();
    if (count > 0) ws.blk.absorb_row(r, c.K(h), d, c.V(h), dv, ws.own.data(), count);
  }
  const index_t row = h * c.sh.m + i0;
  return ws.blk.finish(out + row * dv, dv, stat ? stat + row : nullptr);
}

[[noreturn]] void overflow(const char* what) {
  detail::fail(ErrorKind::invalid_argument, "attention", "the ", what,
               " overflow the floating-point type; rescale queries, keys or values (or pass a smaller scale)");
}

// The float64 reference: BLAS products by tiles, the log-sum-exp in double.
template <class T>
void reference_forward(const AttentionShape& sh, const Selection& sel, const KernelOptions& o, const T* q,
                       const T* k, const T* v, T* out, T* stat) {
  const Ctx<T> c = make_ctx(sh, sel, o, q, k, v);
  LEVATTN_REQUIRE(out && stat, "attention", "null output or statistics buffer");
  const index_t tiles = c.tiles(), pairs = sel.pairs();
  detail::parallel_tasks(pairs * tiles, c.flops() / 2.0, [&] { return Workspace<T>(sh, sel.top_k); },
                         [&](index_t t, Workspace<T>& ws) {
                           const auto [i0, rows] = c.tile(t % tiles);
                           if (rows > 0) forward_tile(c, ws, t / tiles, i0, rows, out, stat);
                         });
  bool ok = finite(out, pairs * sh.m * sh.dv);
  for (index_t i = 0; i < pairs * sh.m; ++i) ok &= !std::isnan(stat[i]) && stat[i] != -std::numeric_limits<T>::infinity();
  if (!ok) overflow("scaled logits or the weighted values");
}

}  // namespace

bool engine::logits_can_overflow(double scale, index_t d, double max_q, double max_k) {
  const double bound = std::fabs(scale) * static_cast<double>(d) * max_q * max_k;
  return !(bound < 0.5 * static_cast<double>(std::numeric_limits<float>::max()));
}

index_t engine::forward(const AttentionShape& sh, const Selection& sel, const KernelOptions& o, const float* q,
                     const float* k, const float* v, float* out, float* stat,
                     const std::function<void(double)>& progress, const CheckedInputs* checked) {
  LEVATTN_REQUIRE(!checked || (q && k && v), "attention", "null data pointer for queries, keys or values");
  Ctx<float> c = checked ? Ctx<float>{sh, sel, make_fn<float>(o, sh.d), q, k, v} : checked_ctx(sh, sel, o, q, k, v);
  // A window band spans a tile's rows plus twice the window: shorter tiles waste fewer masked
  // logits on it (a 128-row tile with w = 128 computes 67% of its band's logits, a 256-row one
  // 50%). Not where one tile holds every query and a shared set too: two tiles would meet the
  // set twice, in twice the (small, set-up bound) products.
  // Where the shared sets are large (causal leverage at a small eps: thousands of keys per
  // segment), gathering them once per tile costs more than the band saves: 256-row tiles.
  index_t widest_set = 0;
  double set_sizes = 0.0;
  for (const std::vector<index_t>& set : sel.shared_keys) {
    widest_set = std::max(widest_set, static_cast<index_t>(set.size()));
    set_sizes += static_cast<double>(set.size());
  }
  const bool band_alone = widest_set == 0;
  const bool small_sets = set_sizes <= static_cast<double>(2 * kernels::kQueryBlock) * static_cast<double>(sel.shared_keys.size());
  c.tile_rows = sel.window > 0 && ((sh.m > kernels::kQueryBlock && small_sets) || band_alone) ? kRows : kernels::kQueryBlock;
  LEVATTN_REQUIRE(out, "attention", "null output buffer");
  const index_t pairs = sel.pairs(), kv_pairs = sh.batch * sh.kv(), tiles = c.tiles(), tasks = pairs * tiles;
  // Inputs are finite (else the error names the entry), and the bound |scale q.k| <= |scale| d
  // max|q| max|k| spares the logit tiles their overflow check. With one tile per pair, each task
  // scans its own pair just before attending it, so that the pair is read from cache, not from
  // memory twice (many pairs of long sequences: decoding over a cache); else one pass first.
  const bool scan_per_pair = !checked && tiles == 1;
  CheckedInputs scanned;
  if (checked) {
    scanned = *checked;
  } else if (!scan_per_pair) {
    scanned.max_q = detail::finite_max_abs({q, pairs * sh.m, sh.d}, "queries");
    scanned.max_k = detail::finite_max_abs({k, kv_pairs * sh.n, sh.d}, "keys");
    detail::require_finite_matrix({v, kv_pairs * sh.n, sh.dv}, "values");
  }
  kernels::KernelParams params;
  params.kernel = o.kernel;
  params.p = static_cast<float>(o.p);
  params.scale = static_cast<float>(c.fn.scale);
  params.ops = &kernels::active_row_ops();
  params.check_overflow = logits_can_overflow(c.fn.scale, sh.d, scanned.max_q, scanned.max_k);
  std::atomic<index_t> done{0}, non_finite{0}, empty{0};
  std::atomic<bool> finite_inputs{true};
  detail::parallel_tasks(tasks, c.flops() / 2.0, [&] { return EngineWorkspace(params, c, widest_set); },
                         [&](index_t t, EngineWorkspace& ws) {
                           const auto [i0, rows] = c.tile(t % tiles);
                           if (scan_per_pair) {
                             const index_t h = t / tiles;
                             const double mq = detail::max_abs_or_non_finite(*params.ops, c.Q(h), sh.m * sh.d);
                             const double mk = detail::max_abs_or_non_finite(*params.ops, c.K(h), sh.n * sh.d);
                             const double mv = detail::max_abs_or_non_finite(*params.ops, c.V(h), sh.n * sh.dv);
                             if (mq < 0.0 || mk < 0.0 || mv < 0.0) {
                               finite_inputs = false;
                               return;
                             }
                             ws.blk.set_check_overflow(logits_can_overflow(c.fn.scale, sh.d, mq, mk));
                           }
                           if (rows > 0) {
                             const kernels::OnlineBlock::Rows r = engine_tile(c, ws, t / tiles, i0, rows, out, stat);
                             non_finite += r.non_finite, empty += r.empty;
                           }
                           const index_t finished = ++done;
                           if (progress && omp_get_thread_num() == 0)
                             progress(static_cast<double>(finished) / static_cast<double>(tasks));
                         });
  if (!finite_inputs) {  // the whole inputs in order, so that the error names the first entry
    detail::require_finite_matrix({q, pairs * sh.m, sh.d}, "queries");
    detail::require_finite_matrix({k, kv_pairs * sh.n, sh.d}, "keys");
    detail::require_finite_matrix({v, kv_pairs * sh.n, sh.dv}, "values");
    detail::fail(ErrorKind::internal, "attention", "a non-finite input was not found again");
  }
  if (non_finite > 0) overflow("scaled logits or the weighted values");
  return empty;
}

template <class T>
void engine::merge(index_t rows, index_t dv, T* out, T* stat, const T* out_b, const T* stat_b) {
  constexpr T none = std::numeric_limits<T>::infinity();
  for (index_t r = 0; r < rows; ++r) {
    const double a = stat[r], b = stat_b[r];
    T* o = out + r * dv;
    const T* ob = out_b + r * dv;
    if (stat_b[r] == none) continue;
    if (stat[r] == none) {
      std::copy_n(ob, dv, o);
      stat[r] = stat_b[r];
      continue;
    }
    const double top = std::max(a, b), l = top + std::log(std::exp(a - top) + std::exp(b - top));
    const double wa = std::exp(a - l), wb = std::exp(b - l);
    for (index_t x = 0; x < dv; ++x) o[x] = static_cast<T>(wa * o[x] + wb * ob[x]);
    stat[r] = static_cast<T>(l);
  }
}
template void engine::merge<float>(index_t, index_t, float*, float*, const float*, const float*);
template void engine::merge<double>(index_t, index_t, double*, double*, const double*, const double*);

template <class T>
void selected_attention_forward(const AttentionShape& sh, const Selection& sel, const KernelOptions& o,
                                const T* q, const T* k, const T* v, T* out, T* stat) {
  LEVATTN_REQUIRE(stat, "attention", "null statistics buffer");
  if constexpr (std::is_same_v<T, float>) engine::forward(sh, sel, o, q, k, v, out, stat, {});
  else reference_forward(sh, sel, o, q, k, v, out, stat);
}

namespace {

// ws.p <- P (weights, 0 where masked), ws.ds <- dS for queries i0 .. of pair h and block b.
template <class T>
void block_grads(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const Block<T>& b,
                 const T* stat, const T* dout, const T* delta) {
  logits(c, ws, h, i0, rows, b);
  const index_t dv = c.sh.dv;
  detail::gemm(kNo, kTr, rows, b.c, dv, T(1), dout + (h * c.sh.m + i0) * dv, dv, b.vb, dv, T(0), ws.ds.data(), b.c);
  for (index_t r = 0; r < rows; ++r) {
    const index_t i = h * c.sh.m + i0 + r;
    T* p = ws.p.data() + r * b.c;
    T* ds = ws.ds.data() + r * b.c;
    const T* s = ws.s.data() + r * b.c;
    if (stat[i] == std::numeric_limits<T>::infinity()) {
      std::fill_n(p, b.c, T(0));
      std::fill_n(ds, b.c, T(0));
      continue;
    }
    exp_rows(p, b.c, stat[i]);
    for (index_t a = 0; a < b.c; ++a) ds[a] = p[a] == T(0) ? T(0) : p[a] * c.fn.dg(s[a]) * (ds[a] - delta[i]);
  }
}

// (P, dS) of one own-key entry from its logit s, g(s), L_i, delta_i and dP = dout_i . v_j:
// P = exp(g - L), dS = P g'(s) (dP - delta).
template <class T>
std::pair<T, T> own_ds(const Ctx<T>& c, T s, T g, T L, T delta, T dp) {
  const T p = std::exp(g - L);
  if (p == T(0)) return {T(0), T(0)};
  return {p, p * c.fn.dg(s) * (dp - delta)};
}

template <class T>
void dq_tile(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const T* stat, const T* dout,
             const T* delta, T* dq) {
  const index_t d = c.sh.d;
  T* dst = dq + (h * c.sh.m + i0) * d;
  std::fill_n(dst, rows * d, T(0));
  for_each_block(c, ws, h, i0, rows, [&](const Block<T>& b) {
    block_grads(c, ws, h, i0, rows, b, stat, dout, delta);
    detail::gemm(kNo, kNo, rows, d, b.c, c.fn.scale, ws.ds.data(), b.c, b.kb, d, T(1), dst, d);
  });
  if (c.sel.top_k == 0) return;
  const index_t dvw = c.sh.dv;
  for (index_t r = 0; r < rows; ++r) {
    const index_t row = h * c.sh.m + i0 + r;
    if (stat[row] == std::numeric_limits<T>::infinity()) continue;
    const index_t count = own_logits(c, ws, h, i0 + r);
    if (count == 0) continue;
    // dP = V_own dout_i, then dS in ws.op, then dq_i += scale K_own^T dS.
    detail::gemv(kNo, count, dvw, T(1), ws.vg.data(), dvw, dout + row * dvw, T(0), ws.op.data());
    for (index_t a = 0; a < count; ++a) ws.op[a] = own_ds(c, ws.os[a], ws.og[a], stat[row], delta[row], ws.op[a]).second;
    detail::gemv(kTr, count, d, c.fn.scale, ws.kg.data(), d, ws.op.data(), T(1), dst + r * d);
  }
}

// A block of keys whose dK and dV one task owns. Shared: positions first .. first + c - 1 of the
// union of pair h's shared sets, met by the segments qlo .. qhi - 1 (those whose sets can hold
// them); contiguous: keys first .. first + c - 1 (every key, or a window band), met by the
// queries qlo .. qhi - 1.
struct KeyTask {
  index_t h, first, c, qlo, qhi;
};

// The tasks of the backward's dK and dV, in two phases (each phase's tasks own distinct keys; the
// second adds to the first): shared keys, then contiguous blocks.
struct KeyPlan {
  std::vector<std::vector<index_t>> unions;  // per pair, the union of its shared sets
  std::vector<KeyTask> shared, contiguous;
};

template <class T>
KeyPlan key_plan(const Ctx<T>& c) {
  KeyPlan kp;
  const index_t n = c.sh.n, m = c.sh.m, w = c.sel.window;
  const bool causal = c.sel.causal;
  kp.unions.resize(static_cast<std::size_t>(c.sel.pairs()));
  for (index_t h = 0; h < c.sel.pairs(); ++h) {
    if (c.sel.all_keys) {
      for (index_t j0 = 0; j0 < n; j0 += kCols) kp.contiguous.push_back({h, j0, std::min(kCols, n - j0), causal ? j0 : 0, m});
      continue;
    }
    auto& u = kp.unions[h];
    const index_t segs = c.sel.shared_keys.empty() ? 0 : c.sel.segments();
    for (index_t s = 0; s < segs; ++s) u.insert(u.end(), c.shared(h, s).begin(), c.shared(h, s).end());
    // The segments holding each key: from the first to the last (causal sets keep a key for a run
    // of segments), so that a block's task visits those only.
    std::vector<index_t> first_seg, last_seg;
    if (segs > 1) {
      std::sort(u.begin(), u.end());
      u.erase(std::unique(u.begin(), u.end()), u.end());
      first_seg.assign(u.size(), segs), last_seg.assign(u.size(), -1);
      for (index_t s = 0; s < segs; ++s)
        for (index_t j : c.shared(h, s)) {
          const auto at = static_cast<std::size_t>(std::lower_bound(u.begin(), u.end(), j) - u.begin());
          first_seg[at] = std::min(first_seg[at], s), last_seg[at] = std::max(last_seg[at], s);
        }
    }
    const index_t size = static_cast<index_t>(u.size());
    for (index_t a0 = 0; a0 < size; a0 += kCols) {
      const index_t cc = std::min(kCols, size - a0);
      index_t lo = 0, hi = segs;
      if (segs > 1) {
        lo = *std::min_element(first_seg.begin() + a0, first_seg.begin() + a0 + cc);
        hi = *std::max_element(last_seg.begin() + a0, last_seg.begin() + a0 + cc) + 1;
      }
      kp.shared.push_back({h, a0, cc, lo, hi});
    }
    if (w < 0) continue;
    for (index_t j0 = 0; j0 < n; j0 += kCols) {
      const index_t cc = std::min(kCols, n - j0);
      const index_t lo = causal ? j0 : std::max<index_t>(0, j0 - w), hi = std::min(m, j0 + cc + w);
      if (lo < hi) kp.contiguous.push_back({h, j0, cc, lo, hi});
    }
  }
  return kp;
}

// Block b's share of dK and dV (into tk, tv: b.c rows, added to) from queries i0 .. i0 + rows - 1.
template <class T>
void block_dkv(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const Block<T>& b,
               const T* stat, const T* dout, const T* delta, T* tk, T* tv) {
  const index_t d = c.sh.d, dvw = c.sh.dv;
  block_grads(c, ws, h, i0, rows, b, stat, dout, delta);
  detail::gemm(kTr, kNo, b.c, dvw, rows, T(1), ws.p.data(), b.c, dout + (h * c.sh.m + i0) * dvw, dvw, T(1), tv, dvw);
  detail::gemm(kTr, kNo, b.c, d, rows, c.fn.scale, ws.ds.data(), b.c, c.Q(h) + i0 * d, d, T(1), tk, d);
}

// Adds rows 0 .. count - 1 of src (width x) to the rows of dst named by key index: row a of src
// belongs to key keys[a], and dst's rows are the keys of `rows_of` (ascending, keys among them).
template <class T>
void scatter_add(const index_t* keys, index_t count, const index_t* rows_of, index_t width, const T* src, T* dst) {
  index_t pos = 0;
  for (index_t a = 0; a < count; ++a) {
    while (rows_of[pos] != keys[a]) ++pos;
    for (index_t x = 0; x < width; ++x) dst[pos * width + x] += src[a * width + x];
  }
}

// A shared-key task: each segment's piece of the block (contiguous in its set), gathered, meets
// that segment's queries (causal: from the piece's first key on).
template <class T>
void dkv_shared(const Ctx<T>& c, Workspace<T>& ws, const std::vector<index_t>& uni, const KeyTask& t, const T* stat,
                const T* dout, const T* delta, T* dk, T* dv) {
  const index_t d = c.sh.d, dvw = c.sh.dv, h = t.h, len = c.seg_len();
  const index_t* keys = uni.data() + t.first;
  std::fill_n(ws.dkb.begin(), t.c * d, T(0));
  std::fill_n(ws.dvb.begin(), t.c * dvw, T(0));
  for (index_t s = t.qlo; s < t.qhi; ++s) {
    const index_t qs = s * len, qe = std::min(c.sh.m, qs + len);
    if (c.sel.causal && qe <= keys[0]) continue;
    const auto& set = c.shared(h, s);
    const auto b0 = std::lower_bound(set.begin(), set.end(), keys[0]);
    const index_t cc = std::upper_bound(b0, set.end(), keys[t.c - 1]) - b0;
    if (cc == 0) continue;
    const Block<T> b = gather(c, ws, h, &*b0, cc);
    const bool whole = cc == t.c;  // the piece is the block itself
    T* tk = whole ? ws.dkb.data() : ws.dkp.data();
    T* tv = whole ? ws.dvb.data() : ws.dvp.data();
    if (!whole) {
      std::fill_n(tk, cc * d, T(0));
      std::fill_n(tv, cc * dvw, T(0));
    }
    for (index_t i0 = c.sel.causal ? std::max(qs, *b0) : qs; i0 < qe; i0 += kRows)
      block_dkv(c, ws, h, i0, std::min(kRows, qe - i0), b, stat, dout, delta, tk, tv);
    if (!whole) {
      scatter_add(b.keys, cc, keys, d, tk, ws.dkb.data());
      scatter_add(b.keys, cc, keys, dvw, tv, ws.dvb.data());
    }
  }
  for (index_t a = 0; a < t.c; ++a) {
    if (dk) std::copy_n(ws.dkb.data() + a * d, d, dk + (h * c.sh.n + keys[a]) * d);
    if (dv) std::copy_n(ws.dvb.data() + a * dvw, dvw, dv + (h * c.sh.n + keys[a]) * dvw);
  }
}

// A contiguous task (every key, or a window band): its queries by tiles that stay within a
// segment (the band's mask depends on the segment's set); added to what the shared keys wrote.
template <class T>
void dkv_contiguous(const Ctx<T>& c, Workspace<T>& ws, const KeyTask& t, const T* stat, const T* dout,
                    const T* delta, T* dk, T* dv) {
  const index_t d = c.sh.d, dvw = c.sh.dv, h = t.h, len = c.seg_len();
  const Block<T> b{c.K(h) + t.first * d, c.V(h) + t.first * dvw, t.c, nullptr, t.first, !c.sel.all_keys};
  std::fill_n(ws.dkb.begin(), t.c * d, T(0));
  std::fill_n(ws.dvb.begin(), t.c * dvw, T(0));
  for (index_t i0 = t.qlo; i0 < t.qhi;) {
    const index_t rows = std::min({kRows, t.qhi - i0, (i0 / len + 1) * len - i0});
    block_dkv(c, ws, h, i0, rows, b, stat, dout, delta, ws.dkb.data(), ws.dvb.data());
    i0 += rows;
  }
  for (index_t a = 0; a < t.c; ++a) {
    const index_t j = t.first + a;
    if (dk)
      for (index_t x = 0; x < d; ++x) dk[(h * c.sh.n + j) * d + x] += ws.dkb[a * d + x];
    if (dv)
      for (index_t x = 0; x < dvw; ++x) dv[(h * c.sh.n + j) * dvw + x] += ws.dvb[a * dvw + x];
  }
}

// The own keys' share of dK and dV, added to what the key blocks wrote: the entries of each pair
// grouped by key (a counting sort; queries ascending within a key), then one task per block of
// keys sums its keys' entries in that order.
template <class T>
void own_keys_dkv(const Ctx<T>& c, const T* stat, const T* dout, const T* delta, T* dk, T* dv) {
  const index_t kk = c.sel.top_k, d = c.sh.d, dvw = c.sh.dv, m = c.sh.m, n = c.sh.n, pairs = c.sel.pairs();
  std::vector<std::vector<index_t>> start(static_cast<std::size_t>(pairs)), entry(start.size());
  detail::parallel_tasks(pairs, static_cast<double>(m * kk) * static_cast<double>(pairs), [] { return 0; },
                         [&](index_t h, int&) {
                           const index_t* keys = c.sel.query_keys.data() + h * m * kk;
                           auto& st = start[h];
                           st.assign(static_cast<std::size_t>(n + 1), 0);
                           for (index_t e = 0; e < m * kk; ++e)
                             if (keys[e] >= 0) ++st[keys[e] + 1];
                           for (index_t j = 0; j < n; ++j) st[j + 1] += st[j];
                           std::vector<index_t> fill(st.begin(), st.end() - 1);
                           entry[h].resize(static_cast<std::size_t>(st[n]));
                           for (index_t e = 0; e < m * kk; ++e)
                             if (keys[e] >= 0) entry[h][fill[keys[e]]++] = e / kk;
                         });
  // Per key, its entries' q and dout rows gathered: s = Q_e k_j, dP = Dout_e v_j, then
  // dk_j += scale Q_e^T dS and dv_j += Dout_e^T P.
  struct Rows {
    std::vector<T> q, g, s, p, ds;
  };
  const index_t blocks = (n + kCols - 1) / kCols;
  detail::parallel_tasks(pairs * blocks, c.flops() / 4.0, [] { return Rows(); }, [&](index_t t, Rows& w) {
    const index_t h = t / blocks, j0 = (t % blocks) * kCols, j1 = std::min(n, j0 + kCols);
    for (index_t j = j0; j < j1; ++j) {
      const index_t e0 = start[h][j], count = start[h][j + 1] - e0;
      if (count == 0) continue;
      w.q.resize(static_cast<std::size_t>(count * d));
      w.g.resize(static_cast<std::size_t>(count * dvw));
      w.s.resize(static_cast<std::size_t>(count));
      w.p.resize(w.s.size());
      w.ds.resize(w.s.size());
      for (index_t x = 0; x < count; ++x) {
        const index_t i = entry[h][e0 + x];
        std::copy_n(c.Q(h) + i * d, d, w.q.data() + x * d);
        std::copy_n(dout + (h * m + i) * dvw, dvw, w.g.data() + x * dvw);
      }
      detail::gemv(kNo, count, d, c.fn.scale, w.q.data(), d, c.K(h) + j * d, T(0), w.s.data());
      detail::gemv(kNo, count, dvw, T(1), w.g.data(), dvw, c.V(h) + j * dvw, T(0), w.ds.data());
      for (index_t x = 0; x < count; ++x) {
        const index_t row = h * m + entry[h][e0 + x];
        const bool empty = stat[row] == std::numeric_limits<T>::infinity();
        const auto pd = empty ? std::pair<T, T>{T(0), T(0)}
                              : own_ds(c, w.s[x], c.fn.g(w.s[x]), stat[row], delta[row], w.ds[x]);
        w.p[x] = pd.first;
        w.ds[x] = pd.second;
      }
      if (dk) detail::gemv(kTr, count, d, c.fn.scale, w.q.data(), d, w.ds.data(), T(1), dk + (h * n + j) * d);
      if (dv) detail::gemv(kTr, count, dvw, T(1), w.g.data(), dvw, w.p.data(), T(1), dv + (h * n + j) * dvw);
    }
  });
}

}  // namespace

namespace {

// out (batch * kv, n, w) <- per kv pair, the sum of its query pairs' rows of src (pairs, n, w), in
// ascending order of query head (nothing when out is null).
template <class T>
void sum_groups(const AttentionShape& sh, const T* src, index_t w, T* out) {
  if (!out) return;
  const index_t size = sh.n * w, kv_pairs = sh.batch * sh.kv();
  std::fill_n(out, kv_pairs * size, T(0));
  for (index_t h = 0; h < sh.batch * sh.heads; ++h) {
    T* dst = out + sh.kv_pair(h) * size;
    const T* s = src + h * size;
    for (index_t x = 0; x < size; ++x) dst[x] += s[x];
  }
}

}  // namespace

template <class T>
void selected_attention_backward(const AttentionShape& sh, const Selection& sel, const KernelOptions& o,
                                 const T* q, const T* k, const T* v, const T* out, const T* stat, const T* dout,
                                 T* dq, T* dk, T* dv) {
  const Ctx<T> c = make_ctx(sh, sel, o, q, k, v);
  const index_t pairs = sel.pairs(), rows = pairs * sh.m;
  LEVATTN_REQUIRE(out && stat && dout, "attention backward", "null output, statistics or output gradient");
  LEVATTN_REQUIRE(finite(dout, rows * sh.dv), "output gradient", "expected finite values (found NaN or Inf)");
  LEVATTN_REQUIRE(finite(out, rows * sh.dv), "attention backward", "the saved output is not finite");
  std::vector<T> delta(static_cast<std::size_t>(rows));
  for (index_t i = 0; i < rows; ++i) {
    LEVATTN_REQUIRE(!std::isnan(stat[i]), "attention backward", "the saved row statistics contain NaN");
    T s = 0;
    for (index_t x = 0; x < sh.dv; ++x) s += dout[i * sh.dv + x] * out[i * sh.dv + x];
    delta[i] = s;
  }
  const auto make = [&] { return Workspace<T>(sh, sel.top_k); };
  const index_t tiles = c.tiles();
  if (dq)
    detail::parallel_tasks(pairs * tiles, 0.6 * c.flops(), make, [&](index_t t, Workspace<T>& ws) {
      const auto [i0, count] = c.tile(t % tiles);
      if (count > 0) dq_tile(c, ws, t / tiles, i0, count, stat, dout, delta.data(), dq);
    });
  if (dk || dv) {
    // Grouped shapes: each query pair's share of dK and dV first, then summed per kv head.
    const bool grouped = sh.kv() != sh.heads;
    std::vector<T> dk_pairs(static_cast<std::size_t>(grouped && dk ? pairs * sh.n * sh.d : 0));
    std::vector<T> dv_pairs(static_cast<std::size_t>(grouped && dv ? pairs * sh.n * sh.dv : 0));
    T* const dk_out = dk;
    T* const dv_out = dv;
    if (grouped) dk = dk ? dk_pairs.data() : nullptr, dv = dv ? dv_pairs.data() : nullptr;
    if (dk) std::fill_n(dk, pairs * sh.n * sh.d, T(0));
    if (dv) std::fill_n(dv, pairs * sh.n * sh.dv, T(0));
    const KeyPlan kp = key_plan(c);
    const double share = 0.8 * c.flops() / static_cast<double>(std::max<std::size_t>(1, kp.shared.size() + kp.contiguous.size()));
    detail::parallel_tasks(static_cast<index_t>(kp.shared.size()), share * static_cast<double>(kp.shared.size()), make,
                           [&](index_t t, Workspace<T>& ws) {
                             const KeyTask& task = kp.shared[t];
                             dkv_shared(c, ws, kp.unions[task.h], task, stat, dout, delta.data(), dk, dv);
                           });
    detail::parallel_tasks(static_cast<index_t>(kp.contiguous.size()), share * static_cast<double>(kp.contiguous.size()),
                           make, [&](index_t t, Workspace<T>& ws) {
                             dkv_contiguous(c, ws, kp.contiguous[t], stat, dout, delta.data(), dk, dv);
                           });
    if (sel.top_k > 0) own_keys_dkv(c, stat, dout, delta.data(), dk, dv);
    if (grouped) {
      sum_groups(sh, dk_pairs.data(), sh.d, dk_out);
      sum_groups(sh, dv_pairs.data(), sh.dv, dv_out);
      dk = dk_out, dv = dv_out;
    }
  }
  const index_t kv_pairs = sh.batch * sh.kv();
  const bool ok = (!dq || finite(dq, rows * sh.d)) && (!dk || finite(dk, kv_pairs * sh.n * sh.d)) &&
                  (!dv || finite(dv, kv_pairs * sh.n * sh.dv));
  if (!ok) overflow("gradients");
}

template void selected_attention_forward<float>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                const float*, const float*, const float*, float*, float*);
template void selected_attention_forward<double>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                 const double*, const double*, const double*, double*, double*);
template void selected_attention_backward<float>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                 const float*, const float*, const float*, const float*, const float*,
                                                 const float*, float*, float*, float*);
template void selected_attention_backward<double>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                  const double*, const double*, const double*, const double*,
                                                  const double*, const double*, double*, double*, double*);

}  // namespace levattn
