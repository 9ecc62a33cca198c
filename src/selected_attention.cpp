// The attention engine's forward: attention over a fixed selection. Each query tile meets its
// keys as blocks (engine_tiles.hpp), then each query its own keys, in an online log-sum-exp over
// all of them. The float32 forward runs on the ISA row kernels (kernels::OnlineBlock); the float64
// forward, on BLAS products, is the reference. The backward is selected_attention_backward.cpp.
#include "levattn/selected_attention.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>

#include "detail/parallel.hpp"
#include "engine.hpp"
#include "engine_tiles.hpp"
#include "kernels/elementwise.hpp"
#include "kernels/online_attention.hpp"

namespace levattn {
namespace engine {

void check_shape(const AttentionShape& sh) {
  LEVATTN_REQUIRE(sh.batch >= 1 && sh.heads >= 1 && sh.m >= 1 && sh.n >= 1 && sh.d >= 1 && sh.dv >= 1, "attention",
                  "expected non-empty inputs, got (batch, heads) = (", sh.batch, ", ", sh.heads, "), ", sh.m,
                  " queries, ", sh.n, " keys, d = ", sh.d, ", dv = ", sh.dv);
  LEVATTN_REQUIRE(sh.kv_heads >= 0 && sh.heads % sh.kv() == 0, "attention", "the key/value heads (", sh.kv_heads,
                  ") must divide the query heads (", sh.heads, ")");
  const index_t pairs = checked_elements({sh.batch, sh.heads}, "attention (batch, heads)");
  checked_elements({pairs, std::max(sh.m, sh.n), std::max(sh.d, sh.dv)}, "attention inputs");
}

// The residual part: per block, keys ascending and distinct, then -1; each open, outside the
// block's shared set and (causal) before the block's end; a finite weight > 0.
static void check_residual(const Selection& sel) {
  const index_t pairs = sel.pairs(), blocks = sel.residual_blocks(), r = sel.residual;
  LEVATTN_REQUIRE(r >= 0 && r <= sel.n && static_cast<index_t>(sel.residual_keys.size()) == pairs * blocks * r &&
                      static_cast<index_t>(sel.residual_weight.size()) == (r > 0 ? pairs * blocks : 0),
                  "selection", "sampled keys must be (pairs, residual blocks, residual) with 0 <= residual <= n, their "
                  "weights (pairs, residual blocks)");
  LEVATTN_REQUIRE(!sel.all_keys || r == 0, "selection", "all keys leaves none to sample");
  const index_t len = sel.segment > 0 ? sel.segment : sel.m;
  for (index_t h = 0; h < pairs && r > 0; ++h)
    for (index_t b = 0; b < blocks; ++b) {
      const index_t i0 = b / sel.blocks_per_segment() * len + b % sel.blocks_per_segment() * kResidualBlock;
      const index_t end = std::min({sel.m, i0 + kResidualBlock, (b / sel.blocks_per_segment() + 1) * len});
      const std::vector<index_t>& shared = sel.shared_of(h, std::min(i0, sel.m - 1));
      const index_t* keys = sel.residual_keys.data() + (h * blocks + b) * r;
      const double w = sel.residual_weight[static_cast<std::size_t>(h * blocks + b)];
      LEVATTN_REQUIRE(std::isfinite(w) && w > 0.0, "selection", "the weight of sampled keys must be finite and > 0, got ", w);
      for (index_t a = 0; a < r; ++a) {
        const index_t j = keys[a];
        if (j == -1) {
          LEVATTN_REQUIRE(a + 1 == r || keys[a + 1] == -1, "selection", "a block's unused slots (-1) must come last");
          continue;
        }
        LEVATTN_REQUIRE(j >= 0 && j < sel.n && (a == 0 || j > keys[a - 1]), "selection",
                        "a block's sampled keys must be ascending, distinct and in [0, n) (-1 for an unused slot)");
        LEVATTN_REQUIRE(!sel.causal || j < end, "selection", "a causal block's sampled keys must not follow its queries");
        LEVATTN_REQUIRE(sel.key_open(h, j) && !std::binary_search(shared.begin(), shared.end(), j), "selection",
                        "a block's sampled keys must be open keys outside its shared set");
      }
    }
}

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
  LEVATTN_REQUIRE(sel.top_k >= 0 && sel.top_k <= sel.n &&
                      static_cast<index_t>(sel.query_keys.size()) == pairs * sel.m * sel.top_k,
                  "selection", "per-query keys must be (pairs, m, top_k) with 0 <= top_k <= n");
  check_residual(sel);
  if (sel.top_k == 0) return;
  // Each query's own keys: distinct, in range (or -1), causal if the selection is, and neither
  // in its shared set (marked per set: `shared` holds the set's number) nor in its window. The
  // checks of a key are folded into one branch, with the fields read into locals first (the
  // loop stores to `stamp`, which the compiler cannot prove apart from them): at d = 16 this
  // pass is a fair part of a forward over 32 own keys per query.
  const index_t n = sel.n, m = sel.m, kk = sel.top_k, window = sel.window, segment = sel.segment;
  const bool causal = sel.causal;
  const index_t* own = sel.query_keys.data();
  std::vector<index_t> stamp(static_cast<std::size_t>(n), -1), shared(stamp.size(), -1);
  for (index_t h = 0; h < pairs; ++h) {
    const std::uint8_t* open = sel.key_mask.empty() ? nullptr : sel.key_mask.data() + h / sel.heads * n;
    for (index_t i = 0; i < m; ++i) {
      const index_t row = h * m + i, set = h * sel.segments() + (segment > 0 ? i / segment : 0);
      if (!sel.shared_keys.empty() && (i == 0 || (segment > 0 && i % segment == 0)))
        for (index_t j : sel.shared_keys[set]) shared[j] = set;
      for (index_t a = 0; a < kk; ++a) {
        const index_t j = own[row * kk + a];
        if (j == -1) continue;
        LEVATTN_REQUIRE(static_cast<std::uint64_t>(j) < static_cast<std::uint64_t>(n), "selection",
                        "each query's keys must be distinct and in [0, n) (-1 for an unused slot)");
        const bool bad = (stamp[j] == row) | (causal & (j > i)) | (open != nullptr && !open[j]) | (shared[j] == set) |
                         ((window >= 0) & (std::abs(i - j) <= window));
        if (bad) {
          LEVATTN_REQUIRE(stamp[j] != row, "selection",
                          "each query's keys must be distinct and in [0, n) (-1 for an unused slot)");
          LEVATTN_REQUIRE(!causal || j <= i, "selection", "a causal query's own keys must not follow it");
          LEVATTN_REQUIRE(!open || open[j], "selection", "a query's own keys hold a masked key");
          detail::fail(ErrorKind::invalid_argument, "selection",
                       "a query's own keys must not repeat its shared keys or its window");
        }
        stamp[j] = row;
      }
    }
  }
}

[[noreturn]] void overflow(const char* what) {
  detail::fail(ErrorKind::invalid_argument, "attention", "the ", what,
               " overflow the floating-point type; rescale queries, keys or values (or pass a smaller scale)");
}

}  // namespace engine

namespace {

using namespace engine;

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

// Row r's own keys into the tile's running maximum, sum and accumulator (after its blocks).
template <class T>
void absorb_own(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t r) {
  const index_t count = own_keys(c, ws, h, i0 + r), d = c.sh.d, dv = c.sh.dv;
  if (count == 0) return;
  const RowKernels<T> rk;
  rk.dots(c.Q(h) + (i0 + r) * d, ws.own.data(), count, c.K(h), d, c.fn.scale, ws.os.data());
  for (index_t a = 0; a < count; ++a) ws.og[a] = c.fn.g(ws.os[a]);
  const T nm = std::max(ws.mx[r], *std::max_element(ws.og.begin(), ws.og.begin() + count));
  if (nm == -std::numeric_limits<T>::infinity()) return;
  T* acc = ws.acc.data() + r * dv;
  if (ws.mx[r] != nm) {
    const T f = std::exp(ws.mx[r] - nm);
    ws.l[r] *= static_cast<double>(f);
    for (index_t x = 0; x < dv; ++x) acc[x] *= f;
    ws.mx[r] = nm;
  }
  ws.l[r] += static_cast<double>(exp_rows(ws.og.data(), count, nm));
  rk.weighted_sum(ws.og.data(), ws.own.data(), count, c.V(h), dv, acc);
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
  if (c.sel.residual > 0) {
    const T lw = sampled_log_weight(c, h, i0);
    for_each_sampled(c, ws.gk.data(), ws.gv.data(), kCols, h, i0, rows, [&](const Block<T>& b) {
      logits(c, ws, h, i0, rows, b);
      mask_sampled(c, ws.slot_of.data(), h, i0, rows, b, ws.p.data());
      for (index_t e = 0; e < rows * b.c; ++e) ws.p[e] += lw;
      absorb(c, ws, rows, b);
    });
  }
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

// The float32 engine's per-thread state: the online block (up to a tile's rows, key tiles of up
// to kernels::kKeyTile), gathered shared key and value rows (only where the selection has shared
// sets or sampled keys), a window band's membership flags and one query's own keys. Sized to the call, and left
// uninitialised where every element is written before it is read: a decoding step attends one
// query over a few hundred keys, and zero-filling full-size buffers would cost more than that.
struct EngineWorkspace {
  kernels::OnlineBlock blk;
  std::unique_ptr<float[]> gk, gv;
  std::vector<char> flags;
  std::vector<index_t> own;      // one query's own keys, unused slots left out
  std::vector<index_t> slot_of;  // mask_sampled's scratch (n entries of -1; empty if not needed)
  EngineWorkspace(const kernels::KernelParams& params, const Ctx<float>& c, index_t widest_set)
      : blk(params, std::min(c.tile_rows, c.sh.m), std::min(kernels::kKeyTile, c.sh.n), c.sh.dv),
        gk(new float[static_cast<std::size_t>(std::min(kernels::kKeyTile, widest_set) * c.sh.d)]),
        gv(new float[static_cast<std::size_t>(std::min(kernels::kKeyTile, widest_set) * c.sh.dv)]),
        flags(static_cast<std::size_t>(std::min(kernels::kKeyTile, c.sh.n))),
        own(static_cast<std::size_t>(c.sel.top_k)),
        slot_of(static_cast<std::size_t>(c.sel.residual > 0 && c.sel.top_k > 0 ? c.sh.n : 0), -1) {}
};

// Queries i0 .. i0 + rows - 1 of pair h in float32: their blocks of keys through the online
// block (logits, the selection's masks written into the logit tile, the online update), then
// their block's sampled keys (weighted), then each query's own keys; out and (unless null) stat
// rows written.
kernels::OnlineBlock::Rows engine_tile(const Ctx<float>& c, EngineWorkspace& ws, index_t h, index_t i0, index_t rows,
                                       float* out, float* stat) {
  const index_t d = c.sh.d, dv = c.sh.dv, kk = c.sel.top_k;
  ws.blk.begin(c.Q(h) + i0 * d, d, rows, d);
  for_each_block(c, ws.gk.get(), ws.gv.get(), kernels::kKeyTile, h, i0, rows, [&](const Block<float>& b) {
    float* tile = ws.blk.logits(b.kb, d, b.c);
    mask_block(c, ws.flags.data(), h, i0, rows, b, tile);
    ws.blk.absorb(b.vb, dv, b.c);
  });
  if (c.sel.residual > 0) {
    const float lw = sampled_log_weight(c, h, i0);
    for_each_sampled(c, ws.gk.get(), ws.gv.get(), kernels::kKeyTile, h, i0, rows, [&](const Block<float>& b) {
      float* tile = ws.blk.logits(b.kb, d, b.c);
      mask_block(c, ws.flags.data(), h, i0, rows, b, tile);
      mask_sampled(c, ws.slot_of.data(), h, i0, rows, b, tile);
      ws.blk.weigh(lw);
      ws.blk.absorb(b.vb, dv, b.c);
    });
  }
  for (index_t r = 0; r < rows && kk > 0; ++r) {
    const index_t* slots = c.sel.query_keys.data() + (h * c.sh.m + i0 + r) * kk;
    const index_t count = std::copy_if(slots, slots + kk, ws.own.begin(), [](index_t j) { return j >= 0; }) - ws.own.begin();
    if (count > 0) ws.blk.absorb_row(r, c.K(h), d, c.V(h), dv, ws.own.data(), count);
  }
  const index_t row = h * c.sh.m + i0;
  return ws.blk.finish(out + row * dv, dv, stat ? stat + row : nullptr);
}

// The float64 reference: BLAS products by tiles, the log-sum-exp in double.
template <class T>
void reference_forward(const AttentionShape& sh, const Selection& sel, const KernelOptions& o, const T* q,
                       const T* k, const T* v, T* out, T* stat) {
  const Ctx<T> c = make_ctx(sh, sel, o, q, k, v);
  LEVATTN_REQUIRE(out && stat, "attention", "null output or statistics buffer");
  const index_t tiles = c.tiles(), pairs = sel.pairs();
  detail::parallel_tasks(pairs * tiles, c.flops() / 2.0, [&] { return Workspace<T>(sh, sel); },
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
  const index_t gathered = std::max(widest_set, sel.residual);  // gk and gv also take sampled keys
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
  params.bf16 = o.precision == Precision::bfloat16 && bf16_products();
  std::atomic<index_t> done{0}, non_finite{0}, empty{0};
  std::atomic<bool> finite_inputs{true};
  detail::parallel_tasks(tasks, c.flops() / 2.0, [&] { return EngineWorkspace(params, c, gathered); },
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

template void selected_attention_forward<float>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                const float*, const float*, const float*, float*, float*);
template void selected_attention_forward<double>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                 const double*, const double*, const double*, double*, double*);

}  // namespace levattn
