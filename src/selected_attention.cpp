// The attention engine: attention over a fixed selection and its gradients. Each query tile
// meets its keys as blocks (shared keys gathered, the window band masked, or every key), then
// each query its own keys; the forward runs an online log-sum-exp over all of them, the backward
// recomputes the weights from the saved row statistics. The float32 forward runs on the ISA row
// kernels (kernels::OnlineBlock); the float64 forward and both backwards on BLAS products, the
// float64 forward serving as the reference. The backward meets each (tile, block) and each own
// key once, as in FlashAttention-2; a pair's tiles run in chunks whose dK and dV shares are summed
// in chunk order, so that every sum has a fixed order, whatever the threads.
#include "levattn/selected_attention.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <tuple>

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
constexpr index_t kCols = 512;  // keys per block (BLAS paths)
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
  std::vector<T> s, p, ds, acc, gk, gv;
  std::vector<char> flags;
  std::vector<double> l;
  std::vector<T> mx;
  std::vector<index_t> own;
  std::vector<T> os, og, op, kg, vg;  // own keys: logits, g, weights or dP, gathered K and V rows
  // The backward's current shared set, gathered once for the tiles of a chunk that meet it
  // (set_k, set_v), and its keys' dK and dV summed over those tiles (set_dk, set_dv; rows 0 ..
  // set_used - 1 written), in the set's order until the chunk leaves it.
  const std::vector<index_t>* set = nullptr;
  index_t set_used = 0;
  std::vector<T> set_k, set_v, set_dk, set_dv;
  std::vector<index_t> row_of;  // a chunk's key-to-row map of its partial buffers (KeyRows)
  Workspace(const AttentionShape& sh, index_t top_k)
      : s(kRows * kCols), p(kRows * kCols), ds(kRows * kCols), acc(static_cast<std::size_t>(kRows * sh.dv)),
        gk(static_cast<std::size_t>(kCols * sh.d)), gv(static_cast<std::size_t>(kCols * sh.dv)), flags(kCols),
        l(kRows), mx(kRows),
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

// ws.p <- P (weights, 0 where masked), ws.ds <- dS for queries i0 .. of pair h and block b. In
// float32 one pass of the ISA kernel per row (RowOps::weight_grads) takes the masked logits (in
// ws.p for softmax, ws.s for the power kernel) to both; in float64 the reference loops.
template <class T>
void block_grads(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const Block<T>& b,
                 const T* stat, const T* dout, const T* delta) {
  constexpr bool isa = std::is_same_v<T, float>;
  T* const tile = c.fn.power ? ws.s.data() : ws.p.data();
  if constexpr (isa) {
    detail::gemm(kNo, kTr, rows, b.c, c.sh.d, c.fn.scale, c.Q(h) + i0 * c.sh.d, c.sh.d, b.kb, c.sh.d, T(0), tile, b.c);
    mask_block(c, ws.flags.data(), h, i0, rows, b, tile);
  } else {
    logits(c, ws, h, i0, rows, b);
  }
  const index_t dv = c.sh.dv;
  detail::gemm(kNo, kTr, rows, b.c, dv, T(1), dout + (h * c.sh.m + i0) * dv, dv, b.vb, dv, T(0), ws.ds.data(), b.c);
  const kernels::RowOps* ops = isa ? &kernels::active_row_ops() : nullptr;
  for (index_t r = 0; r < rows; ++r) {
    const index_t i = h * c.sh.m + i0 + r;
    T* p = ws.p.data() + r * b.c;
    T* ds = ws.ds.data() + r * b.c;
    if (stat[i] == std::numeric_limits<T>::infinity()) {
      std::fill_n(p, b.c, T(0));
      std::fill_n(ds, b.c, T(0));
      continue;
    }
    if constexpr (isa) {
      ops->weight_grads(tile + r * b.c, p, ds, b.c, stat[i], c.fn.power ? c.fn.p : 0.0f, delta[i]);
    } else {
      exp_rows(p, b.c, stat[i]);
      const T* s = ws.s.data() + r * b.c;
      for (index_t a = 0; a < b.c; ++a) ds[a] = p[a] == T(0) ? T(0) : p[a] * c.fn.dg(s[a]) * (ds[a] - delta[i]);
    }
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

// The rows a task adds its shares of dK and dV to (k and v: null where not wanted): the pair's
// own gradients (row_of null: row j is key j), or a partial buffer whose row for key j is
// row_of[j] (n entries, those of the keys the chunk meets set).
template <class T>
struct KeyRows {
  T *k = nullptr, *v = nullptr;
  const index_t* row_of = nullptr;
  index_t row(index_t j) const { return row_of ? row_of[j] : j; }
};

// Query i of pair h over its own keys (L: its log-normaliser, dout_i its output gradient):
// dq_i += scale sum_j dS_ij k_j (dq_i unless null), and its shares of dK and dV added to the own
// keys' rows of `to`: dk_j += scale dS_ij q_i, dv_j += P_ij dout_i.
template <class T>
void own_key_grads(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i, T L, T delta, const T* dout_i, T* dq_i,
                   const KeyRows<T>& to) {
  const index_t d = c.sh.d, dv = c.sh.dv;
  const T* q_i = c.Q(h) + i * d;
  index_t count = 0;
  if constexpr (std::is_same_v<T, float>) {  // straight from the rows of K, V and the gradients
    const kernels::RowOps& ops = kernels::active_row_ops();
    const index_t* slots = c.sel.query_keys.data() + (h * c.sh.m + i) * c.sel.top_k;
    count = std::copy_if(slots, slots + c.sel.top_k, ws.own.begin(), [](index_t j) { return j >= 0; }) - ws.own.begin();
    if (count == 0) return;
    ops.gathered_dots(q_i, ws.own.data(), count, c.K(h), d, d, c.fn.scale, ws.os.data());
    ops.gathered_dots(dout_i, ws.own.data(), count, c.V(h), dv, dv, 1.0f, ws.op.data());
    ops.weight_grads(ws.os.data(), ws.og.data(), ws.op.data(), count, L, c.fn.power ? c.fn.p : 0.0f, delta);
    for (index_t a = 0; a < count; ++a) ws.op[a] *= c.fn.scale;  // scale dS, for dq and dK alike
    if (dq_i) ops.gathered_weighted_sum(ws.op.data(), ws.own.data(), count, c.K(h), d, d, dq_i);
    if (to.row_of)
      for (index_t a = 0; a < count; ++a) ws.own[a] = to.row(ws.own[a]);
    if (to.k) ops.scatter_scaled(ws.op.data(), ws.own.data(), count, q_i, to.k, d, d);
    if (to.v) ops.scatter_scaled(ws.og.data(), ws.own.data(), count, dout_i, to.v, dv, dv);
  } else {  // the float64 reference: gathered rows and level-2 BLAS
    count = own_logits(c, ws, h, i);
    if (count == 0) return;
    detail::gemv(kNo, count, dv, T(1), ws.vg.data(), dv, dout_i, T(0), ws.op.data());
    for (index_t a = 0; a < count; ++a) {
      std::tie(ws.og[a], ws.op[a]) = own_ds(c, ws.os[a], ws.og[a], L, delta, ws.op[a]);
      ws.op[a] *= c.fn.scale;
    }
    if (dq_i) detail::gemv(kTr, count, d, T(1), ws.kg.data(), d, ws.op.data(), T(1), dq_i);
    for (index_t a = 0; a < count; ++a) {
      const index_t at = to.row(ws.own[a]);
      for (index_t x = 0; to.k && x < d; ++x) to.k[at * d + x] += ws.op[a] * q_i[x];
      for (index_t x = 0; to.v && x < dv; ++x) to.v[at * dv + x] += ws.og[a] * dout_i[x];
    }
  }
}

// Adds the sums of the workspace's current shared set (if any) to the rows of its keys in `to`,
// zeroes them, and leaves the set.
template <class T>
void leave_set(const Ctx<T>& c, Workspace<T>& ws, const KeyRows<T>& to) {
  if (!ws.set) return;
  const index_t d = c.sh.d, dv = c.sh.dv;
  const auto add = [](T* dst, T* src, index_t width) {
    for (index_t x = 0; x < width; ++x) dst[x] += src[x], src[x] = T(0);
  };
  for (index_t a = 0; a < ws.set_used; ++a) {
    const index_t at = to.row((*ws.set)[a]);
    if (to.k) add(to.k + at * d, ws.set_dk.data() + a * d, d);
    if (to.v) add(to.v + at * dv, ws.set_dv.data() + a * dv, dv);
  }
  ws.set = nullptr, ws.set_used = 0;
}

// Makes `set` (one of pair h's shared sets) the workspace's current one, leaving the one before:
// its keys' K and V rows gathered once for the chunk's tiles that meet it. Its sums are zero (a
// set left is zeroed, and growth fills with zeros).
template <class T>
void enter_set(const Ctx<T>& c, Workspace<T>& ws, index_t h, const std::vector<index_t>& set, const KeyRows<T>& to) {
  if (ws.set == &set) return;
  leave_set(c, ws, to);
  const auto u = static_cast<index_t>(set.size());
  const auto grow = [](std::vector<T>& x, index_t size) {
    if (static_cast<index_t>(x.size()) < size) x.resize(static_cast<std::size_t>(size));
  };
  grow(ws.set_k, u * c.sh.d), grow(ws.set_v, u * c.sh.dv);
  if (to.k) grow(ws.set_dk, u * c.sh.d);
  if (to.v) grow(ws.set_dv, u * c.sh.dv);
  gather(c, ws.set_k.data(), ws.set_v.data(), h, set.data(), u);
  ws.set = &set;
}

// The gradients of queries i0 .. i0 + rows - 1 of pair h, each block met once (five products: the
// logits, dP, and the three gradients): dq's rows (unless null) written, and the blocks' shares
// of dK and dV added to `to`.
template <class T>
void backward_tile(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const T* stat,
                   const T* dout, const T* delta, T* dq, const KeyRows<T>& to) {
  const index_t d = c.sh.d, dvw = c.sh.dv;
  const T* qt = c.Q(h) + i0 * d;
  const T* gt = dout + (h * c.sh.m + i0) * dvw;
  T* dst = dq ? dq + (h * c.sh.m + i0) * d : nullptr;
  if (dst) std::fill_n(dst, rows * d, T(0));
  for_each_block(c, ws.set_k.data(), ws.set_v.data(), kCols, h, i0, rows, [&](const Block<T>& b) {
    block_grads(c, ws, h, i0, rows, b, stat, dout, delta);
    if (dst) detail::gemm(kNo, kNo, rows, d, b.c, c.fn.scale, ws.ds.data(), b.c, b.kb, d, T(1), dst, d);
    // A contiguous block's keys are consecutive rows of `to`; a gathered block's are rows of the
    // set's own sums (ws.set_dk, ws.set_dv), added to `to` when the chunk leaves the set.
    const index_t first = b.keys ? b.keys - ws.set->data() : to.row(b.j0);
    if (b.keys) ws.set_used = std::max(ws.set_used, first + b.c);
    const auto add = [&](T* grad, index_t width, T alpha, const T* weights, const T* rows_in) {
      if (grad)
        detail::gemm(kTr, kNo, b.c, width, rows, alpha, weights, b.c, rows_in, width, T(1), grad + first * width,
                     width);
    };
    add(!to.v ? nullptr : b.keys ? ws.set_dv.data() : to.v, dvw, T(1), ws.p.data(), gt);
    add(!to.k ? nullptr : b.keys ? ws.set_dk.data() : to.k, d, c.fn.scale, ws.ds.data(), qt);
  }, ws.set != nullptr);
  if (c.sel.top_k == 0) return;
  for (index_t r = 0; r < rows; ++r) {
    const index_t row = h * c.sh.m + i0 + r;
    if (stat[row] != std::numeric_limits<T>::infinity())
      own_key_grads(c, ws, h, i0 + r, stat[row], delta[row], dout + row * dvw, dst ? dst + r * d : nullptr, to);
  }
}

// A run of query tiles t0 .. t1 - 1 of pair h, one task of the backward. The pair's first chunk
// (slot -1) adds its shares of dK and dV to the pair's gradients; each other one to a partial
// buffer over the keys its tiles attend (`keys`, from row `offset` of the partial buffers),
// added to the pair's after every chunk has run, in chunk order. The sums are then the same
// for any number of threads, and no two tasks write the same rows.
struct Chunk {
  index_t h, t0, t1, slot;
  std::vector<index_t> keys;
  index_t offset = 0;
};

// Keys a tile of pair h attends (its work, up to the factor rows (d + dv)).
template <class T>
double tile_keys(const Ctx<T>& c, index_t h, index_t i0, index_t rows) {
  const index_t n = c.sh.n, last = i0 + rows - 1, w = c.sel.window;
  if (c.sel.all_keys) return static_cast<double>(c.sel.causal ? std::min(n, last + 1) : n);
  const auto& keys = c.sel.shared_of(h, i0);
  double u = static_cast<double>(c.sel.causal ? std::upper_bound(keys.begin(), keys.end(), last) - keys.begin()
                                              : static_cast<std::ptrdiff_t>(keys.size()));
  if (w >= 0) {
    const index_t hi = std::min(n, c.sel.causal ? last + 1 : last + 1 + w);
    u += static_cast<double>(hi - std::max<index_t>(0, i0 - w));
  }
  return u + static_cast<double>(c.sel.top_k);
}

// Every key that tiles t0 .. t1 - 1 of pair h meet, ascending (a superset: whole shared sets,
// the band's range with its shared keys, and the queries' own keys).
template <class T>
std::vector<index_t> chunk_keys(const Ctx<T>& c, index_t h, index_t t0, index_t t1) {
  const index_t n = c.sh.n, w = c.sel.window, kk = c.sel.top_k;
  std::vector<char> met(static_cast<std::size_t>(n), 0);
  const std::vector<index_t>* last_set = nullptr;
  for (index_t t = t0; t < t1; ++t) {
    const auto [i0, rows] = c.tile(t);
    if (rows == 0) continue;
    const index_t last = i0 + rows - 1;
    if (c.sel.all_keys) {
      std::fill_n(met.begin(), c.sel.causal ? std::min(n, last + 1) : n, 1);
      continue;
    }
    const std::vector<index_t>& set = c.sel.shared_of(h, i0);
    if (&set != last_set)
      for (index_t j : set) met[j] = 1;
    last_set = &set;
    const index_t* own = c.sel.query_keys.data() + (h * c.sh.m + i0) * kk;
    for (index_t e = 0; e < rows * kk; ++e)
      if (own[e] >= 0) met[own[e]] = 1;
    if (w >= 0)
      std::fill(met.begin() + std::max<index_t>(0, i0 - w), met.begin() + std::min(n, c.sel.causal ? last + 1 : last + 1 + w), 1);
  }
  std::vector<index_t> keys;
  for (index_t j = 0; j < n; ++j)
    if (met[j]) keys.push_back(j);
  return keys;
}

// Each pair's tiles cut into `per_pair` chunks of about equal work (a causal pair's late tiles
// attend more keys), from the shape and selection alone; `keyed`: whether the chunks write dK
// or dV (else they need no keys).
template <class T>
std::vector<Chunk> plan_chunks(const Ctx<T>& c, index_t per_pair, bool keyed) {
  const index_t tiles = c.tiles();
  std::vector<Chunk> chunks;
  std::vector<double> work(static_cast<std::size_t>(tiles));
  index_t slot = 0, offset = 0;
  for (index_t h = 0; h < c.sel.pairs(); ++h) {
    double total = 0.0;
    for (index_t t = 0; t < tiles; ++t) {
      const auto [i0, rows] = c.tile(t);
      total += work[t] = rows > 0 ? static_cast<double>(rows) * tile_keys(c, h, i0, rows) : 0.0;
    }
    double done = 0.0;
    index_t t0 = 0;
    for (index_t k = 0; k < per_pair && t0 < tiles; ++k) {
      index_t t1 = t0;
      const double goal = total * static_cast<double>(k + 1) / static_cast<double>(per_pair);
      while (t1 < tiles && (t1 == t0 || done + work[t1] <= goal || k + 1 == per_pair)) done += work[t1++];
      Chunk ch{h, t0, t1, -1, {}, 0};
      if (k > 0 && keyed) {
        ch.slot = slot++, ch.keys = chunk_keys(c, h, t0, t1), ch.offset = offset;
        offset += static_cast<index_t>(ch.keys.size());
      }
      chunks.push_back(std::move(ch));
      t0 = t1;
    }
  }
  return chunks;
}
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

// Rows of the partial buffers that the chunks need.
inline index_t partial_rows(const std::vector<Chunk>& chunks) {
  index_t rows = 0;
  for (const Chunk& ch : chunks) rows = std::max(rows, ch.offset + static_cast<index_t>(ch.keys.size()));
  return rows;
}

// The backward's chunks: 16 tasks in all where the pairs are fewer (a number that 2, 4, 8 and 16
// threads divide), halved until the partial buffers of dK and dV fit in the gradients' own size
// or 64 MiB (every key for full attention, the shared sets and bands for a selection); with no
// dK or dV, every tile is its own task.
template <class T>
std::vector<Chunk> backward_chunks(const Ctx<T>& c, bool key_grads) {
  const index_t pairs = c.sel.pairs(), tiles = c.tiles();
  if (!key_grads) return plan_chunks(c, tiles, false);
  const double row_bytes = static_cast<double>(c.sh.d + c.sh.dv) * sizeof(T);
  const double budget = std::max(64.0 * 1024 * 1024, static_cast<double>(pairs * c.sh.n) * row_bytes);
  for (index_t per_pair = std::min(tiles, (16 + pairs - 1) / pairs);; per_pair = (per_pair + 1) / 2) {
    std::vector<Chunk> chunks = plan_chunks(c, per_pair, true);
    if (per_pair == 1 || static_cast<double>(partial_rows(chunks)) * row_bytes <= budget) return chunks;
  }
}

// grad (pairs, n, width) += each chunk's partial rows (part: rows of width, from the chunk's
// offset), pair by pair in chunk order; parallel over blocks of keys.
template <class T>
void add_partials(const Ctx<T>& c, const std::vector<Chunk>& chunks, const std::vector<T>& part, index_t width,
                  T* grad) {
  const index_t n = c.sh.n, block = 1024, blocks = (n + block - 1) / block;
  detail::parallel_tasks(c.sel.pairs() * blocks, static_cast<double>(part.size()), [] { return 0; },
                         [&](index_t t, int&) {
                           const index_t h = t / blocks, j0 = (t % blocks) * block, j1 = std::min(n, j0 + block);
                           for (const Chunk& ch : chunks) {
                             if (ch.h != h || ch.slot < 0) continue;
                             const auto lo = std::lower_bound(ch.keys.begin(), ch.keys.end(), j0);
                             const auto hi = std::lower_bound(lo, ch.keys.end(), j1);
                             for (auto it = lo; it != hi; ++it) {
                               const T* from = part.data() + (ch.offset + (it - ch.keys.begin())) * width;
                               T* to = grad + (h * n + *it) * width;
                               for (index_t x = 0; x < width; ++x) to[x] += from[x];
                             }
                           }
                         });
}

// Whether x[0 .. count) is finite, read in parallel blocks.
template <class T>
bool finite_parallel(const T* x, index_t count) {
  const index_t block = index_t(1) << 16, blocks = (count + block - 1) / block;
  std::atomic<bool> ok{true};
  detail::parallel_tasks(blocks, static_cast<double>(count), [] { return 0; }, [&](index_t t, int&) {
    if (!finite(x + t * block, std::min(block, count - t * block))) ok = false;
  });
  return ok;
}
// sum_x a[x] b[x] over eight interleaved partial sums, added in a fixed order (so that it
// vectorises without reassociating anything).
template <class T>
T dot(const T* a, const T* b, index_t n) {
  constexpr index_t L = 8;
  T lane[L] = {};
  index_t x = 0;
  for (; x + L <= n; x += L)
    for (index_t l = 0; l < L; ++l) lane[l] += a[x + l] * b[x + l];
  for (; x < n; ++x) lane[0] += a[x] * b[x];
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Where chunk ch adds its shares of dK and dV, zeroed here: the pair's gradients (its first
// chunk), or its rows of the partial buffers, with their key-to-row map built in ws.row_of.
template <class T>
KeyRows<T> chunk_target(const Ctx<T>& c, const Chunk& ch, Workspace<T>& ws, T* pk, T* pv, std::vector<T>& part_k,
                        std::vector<T>& part_v) {
  const index_t n = c.sh.n, d = c.sh.d, dv = c.sh.dv;
  KeyRows<T> to;
  index_t count = n;
  if (ch.slot < 0) {
    to.k = pk ? pk + ch.h * n * d : nullptr;
    to.v = pv ? pv + ch.h * n * dv : nullptr;
  } else {
    count = static_cast<index_t>(ch.keys.size());
    to.k = pk ? part_k.data() + ch.offset * d : nullptr;
    to.v = pv ? part_v.data() + ch.offset * dv : nullptr;
    ws.row_of.resize(static_cast<std::size_t>(n));
    for (index_t a = 0; a < count; ++a) ws.row_of[ch.keys[a]] = a;
    to.row_of = ws.row_of.data();
  }
  if (to.k) std::fill_n(to.k, count * d, T(0));
  if (to.v) std::fill_n(to.v, count * dv, T(0));
  return to;
}

// A chunk's inputs finite (its query, output and output-gradient rows, and for the first chunk
// of each kv pair's first query pair, the pair's keys and values) and its delta rows written:
// delta_i = dout_i . out_i. False where an entry is NaN or Inf (the caller then names it).
template <class T>
bool chunk_inputs(const Ctx<T>& c, const Chunk& ch, const T* out, const T* stat, const T* dout, T* delta) {
  const index_t d = c.sh.d, dvw = c.sh.dv, h = ch.h;
  if (ch.slot < 0 && (h == 0 || c.sh.kv_pair(h - 1) != c.sh.kv_pair(h)) &&
      !(finite(c.K(h), c.sh.n * d) && finite(c.V(h), c.sh.n * dvw)))
    return false;
  // Tiles run in query order, the last segment's past the last query empty.
  const index_t i0 = std::min(c.sh.m, c.tile(ch.t0).first);
  const index_t i1 = ch.t1 < c.tiles() ? std::min(c.sh.m, c.tile(ch.t1).first) : c.sh.m;
  const index_t r0 = h * c.sh.m + i0, rows = std::max<index_t>(0, i1 - i0);
  if (!finite(c.Q(h) + i0 * d, rows * d) || !finite(dout + r0 * dvw, rows * dvw) || !finite(out + r0 * dvw, rows * dvw))
    return false;
  for (index_t i = r0; i < r0 + rows; ++i) {
    if (std::isnan(stat[i])) return false;
    delta[i] = dot(dout + i * dvw, out + i * dvw, dvw);
  }
  return true;
}

}  // namespace

template <class T>
void selected_attention_backward(const AttentionShape& sh, const Selection& sel, const KernelOptions& o,
                                 const T* q, const T* k, const T* v, const T* out, const T* stat, const T* dout,
                                 T* dq, T* dk, T* dv) {
  const Ctx<T> c = checked_ctx(sh, sel, o, q, k, v);
  const index_t pairs = sel.pairs(), rows = pairs * sh.m, n = sh.n;
  LEVATTN_REQUIRE(out && stat && dout, "attention backward", "null output, statistics or output gradient");
  // Grouped shapes: each query pair's share of dK and dV first, then summed per kv head.
  const bool grouped = sh.kv() != sh.heads;
  std::vector<T> dk_pairs(static_cast<std::size_t>(grouped && dk ? pairs * n * sh.d : 0));
  std::vector<T> dv_pairs(static_cast<std::size_t>(grouped && dv ? pairs * n * sh.dv : 0));
  T* const pk = grouped ? (dk ? dk_pairs.data() : nullptr) : dk;
  T* const pv = grouped ? (dv ? dv_pairs.data() : nullptr) : dv;
  const std::vector<Chunk> chunks = backward_chunks(c, pk || pv);
  const index_t part_rows = partial_rows(chunks);
  std::vector<T> part_k(static_cast<std::size_t>(pk ? part_rows * sh.d : 0));
  std::vector<T> part_v(static_cast<std::size_t>(pv ? part_rows * sh.dv : 0));
  std::vector<T> delta(static_cast<std::size_t>(rows));
  std::atomic<bool> finite_inputs{true};
  const auto make = [&] { return Workspace<T>(sh, sel.top_k); };
  detail::parallel_tasks(static_cast<index_t>(chunks.size()), 1.4 * c.flops(), make,
                         [&](index_t t, Workspace<T>& ws) {
                           const Chunk& ch = chunks[t];
                           const KeyRows<T> to = chunk_target(c, ch, ws, pk, pv, part_k, part_v);
                           if (!chunk_inputs(c, ch, out, stat, dout, delta.data())) {
                             finite_inputs = false;
                             return;
                           }
                           for (index_t tile = ch.t0; tile < ch.t1; ++tile) {
                             const auto [i0, r] = c.tile(tile);
                             if (r == 0) continue;
                             if (!sel.all_keys) enter_set(c, ws, ch.h, sel.shared_of(ch.h, i0), to);
                             backward_tile(c, ws, ch.h, i0, r, stat, dout, delta.data(), dq, to);
                           }
                           leave_set(c, ws, to);
                         });
  if (!finite_inputs) {  // the whole inputs in order, so that the error names the first one
    make_ctx(sh, sel, o, q, k, v);
    LEVATTN_REQUIRE(finite(dout, rows * sh.dv), "output gradient", "expected finite values (found NaN or Inf)");
    LEVATTN_REQUIRE(finite(out, rows * sh.dv), "attention backward", "the saved output is not finite");
    for (index_t i = 0; i < rows; ++i)
      LEVATTN_REQUIRE(!std::isnan(stat[i]), "attention backward", "the saved row statistics contain NaN");
    detail::fail(ErrorKind::internal, "attention backward", "a non-finite input was not found again");
  }
  if (pk && part_rows > 0) add_partials(c, chunks, part_k, sh.d, pk);
  if (pv && part_rows > 0) add_partials(c, chunks, part_v, sh.dv, pv);
  if (grouped) {
    sum_groups(sh, dk_pairs.data(), sh.d, dk);
    sum_groups(sh, dv_pairs.data(), sh.dv, dv);
  }
  const index_t kv_pairs = sh.batch * sh.kv();
  const bool ok = (!dq || finite_parallel(dq, rows * sh.d)) && (!dk || finite_parallel(dk, kv_pairs * n * sh.d)) &&
                  (!dv || finite_parallel(dv, kv_pairs * n * sh.dv));
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
