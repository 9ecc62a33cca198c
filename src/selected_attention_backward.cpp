// The attention engine's backward: the gradients of attention over a fixed selection, from the
// saved output and row statistics. Each (query tile, key block) and each own key is met once, as
// in FlashAttention-2 (five products), the weights recomputed from the statistics; a pair's tiles
// run in chunks whose dK and dV shares are summed in chunk order, so that every sum has a fixed
// order, whatever the threads.
#include "levattn/selected_attention.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "detail/parallel.hpp"
#include "engine_tiles.hpp"
#include "kernels/elementwise.hpp"

namespace levattn {
namespace {

using namespace engine;

// ws.p <- P (weights, 0 where masked), ws.ds <- dS for queries i0 .. of pair h and block b: the
// masked logits (in ws.p for softmax, ws.s for the power kernel) and dP = dout V^T, then one pass
// of RowKernels::weight_grads per row (float32: the ISA kernel).
// A block of sampled keys (sampled) is masked where another part gives a query the key, and its
// weights are those of the log-normaliser L - lw (their weight exp(lw) scales P; dS = P (dP -
// delta) f'/f takes no other factor).
template <class T>
void block_grads(const Ctx<T>& c, const RowKernels<T>& rk, Workspace<T>& ws, index_t h, index_t i0, index_t rows,
                 const Block<T>& b, const T* stat, const T* dout, const T* delta, bool sampled = false, T lw = T(0)) {
  const index_t d = c.sh.d, dv = c.sh.dv;
  T* const tile = c.fn.power ? ws.s.data() : ws.p.data();
  detail::gemm(kNo, kTr, rows, b.c, d, c.fn.scale, c.Q(h) + i0 * d, d, b.kb, d, T(0), tile, b.c);
  mask_block(c, ws.flags.data(), h, i0, rows, b, tile);
  if (sampled) mask_sampled(c, ws.slot_of.data(), h, i0, rows, b, tile);
  detail::gemm(kNo, kTr, rows, b.c, dv, T(1), dout + (h * c.sh.m + i0) * dv, dv, b.vb, dv, T(0), ws.ds.data(), b.c);
  for (index_t r = 0; r < rows; ++r) {
    const index_t i = h * c.sh.m + i0 + r;
    T* p = ws.p.data() + r * b.c;
    T* ds = ws.ds.data() + r * b.c;
    if (stat[i] == std::numeric_limits<T>::infinity()) {
      std::fill_n(p, b.c, T(0));
      std::fill_n(ds, b.c, T(0));
    } else {
      rk.weight_grads(tile + r * b.c, p, ds, b.c, stat[i] - lw, c.fn.power ? c.fn.p : T(0), delta[i]);
    }
  }
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
void own_key_grads(const Ctx<T>& c, const RowKernels<T>& rk, Workspace<T>& ws, index_t h, index_t i, T L, T delta,
                   const T* dout_i, T* dq_i, const KeyRows<T>& to) {
  const index_t count = own_keys(c, ws, h, i), d = c.sh.d, dv = c.sh.dv;
  if (count == 0) return;  // straight from the rows of K, V and the gradients
  const T* q_i = c.Q(h) + i * d;
  rk.dots(q_i, ws.own.data(), count, c.K(h), d, c.fn.scale, ws.os.data());
  rk.dots(dout_i, ws.own.data(), count, c.V(h), dv, T(1), ws.op.data());
  rk.weight_grads(ws.os.data(), ws.og.data(), ws.op.data(), count, L, c.fn.power ? c.fn.p : T(0), delta);
  for (index_t a = 0; a < count; ++a) ws.op[a] *= c.fn.scale;  // scale dS, for dq and dK alike
  if (dq_i) rk.weighted_sum(ws.op.data(), ws.own.data(), count, c.K(h), d, dq_i);
  if (to.row_of)
    for (index_t a = 0; a < count; ++a) ws.own[a] = to.row(ws.own[a]);
  if (to.k) rk.scatter(ws.op.data(), ws.own.data(), count, q_i, to.k, d);
  if (to.v) rk.scatter(ws.og.data(), ws.own.data(), count, dout_i, to.v, dv);
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

// The sampled keys of queries i0 .. i0 + rows - 1 of pair h (their residual block's, gathered
// kCols at a time): dq's rows (dst, unless null) += scale dS K_b, and the keys' dK and dV (formed
// in ws.sdk, ws.sdv) added to their rows of `to`.
template <class T>
void sampled_grads(const Ctx<T>& c, const RowKernels<T>& rk, Workspace<T>& ws, index_t h, index_t i0, index_t rows,
                   const T* stat, const T* dout, const T* delta, T* dst, const KeyRows<T>& to) {
  const index_t d = c.sh.d, dv = c.sh.dv;
  const T lw = sampled_log_weight(c, h, i0);
  const T* qt = c.Q(h) + i0 * d;
  const T* gt = dout + (h * c.sh.m + i0) * dv;
  ws.sdk.resize(static_cast<std::size_t>(kCols * d)), ws.sdv.resize(static_cast<std::size_t>(kCols * dv));
  for_each_sampled(c, ws.gk.data(), ws.gv.data(), kCols, h, i0, rows, [&](const Block<T>& b) {
    block_grads(c, rk, ws, h, i0, rows, b, stat, dout, delta, true, lw);
    if (dst) detail::gemm(kNo, kNo, rows, d, b.c, c.fn.scale, ws.ds.data(), b.c, b.kb, d, T(1), dst, d);
    const auto add = [&](T* grad, std::vector<T>& part, index_t width, T alpha, const T* weights, const T* rows_in) {
      if (!grad) return;
      detail::gemm(kTr, kNo, b.c, width, rows, alpha, weights, b.c, rows_in, width, T(0), part.data(), width);
      for (index_t a = 0; a < b.c; ++a) {
        T* row = grad + to.row(b.keys[a]) * width;
        for (index_t x = 0; x < width; ++x) row[x] += part[a * width + x];
      }
    };
    add(to.v, ws.sdv, dv, T(1), ws.p.data(), gt);
    add(to.k, ws.sdk, d, c.fn.scale, ws.ds.data(), qt);
  });
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
  const RowKernels<T> rk;
  for_each_block(c, ws.set_k.data(), ws.set_v.data(), kCols, h, i0, rows, [&](const Block<T>& b) {
    block_grads(c, rk, ws, h, i0, rows, b, stat, dout, delta);
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
  if (c.sel.residual > 0) sampled_grads(c, rk, ws, h, i0, rows, stat, dout, delta, dst, to);
  if (c.sel.top_k == 0) return;
  for (index_t r = 0; r < rows; ++r) {
    const index_t row = h * c.sh.m + i0 + r;
    if (stat[row] != std::numeric_limits<T>::infinity())
      own_key_grads(c, rk, ws, h, i0 + r, stat[row], delta[row], dout + row * dvw, dst ? dst + r * d : nullptr, to);
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
  return u + static_cast<double>(c.sel.top_k + c.sel.residual);
}

// Every key that tiles t0 .. t1 - 1 of pair h meet, ascending (a superset: whole shared sets,
// the band's range with its shared keys, and the queries' own and sampled keys).
template <class T>
std::vector<index_t> chunk_keys(const Ctx<T>& c, index_t h, index_t t0, index_t t1) {
  const index_t n = c.sh.n, w = c.sel.window;
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
    const index_t* own = c.sel.query_keys.data() + (h * c.sh.m + i0) * c.sel.top_k;
    for (index_t e = 0; e < rows * c.sel.top_k; ++e)
      if (own[e] >= 0) met[own[e]] = 1;
    index_t count = 0;
    const index_t* sampled = sampled_keys(c, h, i0, rows, count);
    for (index_t a = 0; a < count; ++a) met[sampled[a]] = 1;
    const index_t band_end = std::min(n, c.sel.causal ? last + 1 : last + 1 + w);
    if (w >= 0) std::fill(met.begin() + std::max<index_t>(0, i0 - w), met.begin() + band_end, 1);
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
  const auto make = [&] { return Workspace<T>(sh, sel); };
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

template void selected_attention_backward<float>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                 const float*, const float*, const float*, const float*, const float*,
                                                 const float*, float*, float*, float*);
template void selected_attention_backward<double>(const AttentionShape&, const Selection&, const KernelOptions&,
                                                  const double*, const double*, const double*, const double*,
                                                  const double*, const double*, double*, double*, double*);

}  // namespace levattn
