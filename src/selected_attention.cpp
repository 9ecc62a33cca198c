// Attention over a fixed selection and its gradients, templated on the scalar. Each query tile
// meets its keys as blocks (shared keys gathered, the window band masked, or every key), then
// each query its own keys (gathered rows, level-2 BLAS); the forward runs an online log-sum-exp
// over all of them, the backward recomputes the weights from the saved row statistics. dQ is
// summed per query tile, dK and dV per key block and then per key over its own-key entries,
// each in a fixed order.
#include "levattn/selected_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "detail/selection.hpp"
#include "detail/validate.hpp"
#include "kernels/elementwise.hpp"

namespace levattn {
namespace {

constexpr index_t kRows = 128;  // queries per tile
constexpr index_t kCols = 256;  // keys per block

// g(s) and g'(s) of the kernel: the weight of a key is exp(g(s) - L).
template <class T>
struct Fn {
  bool power = false;
  T p = 2, scale = 1;
  T g(T s) const { return !power ? s : s == 0 ? -std::numeric_limits<T>::infinity() : p * std::log(std::fabs(s)); }
  T dg(T s) const { return !power ? T(1) : s == 0 ? T(0) : p / s; }
};

template <class T>
Fn<T> make_fn(const AttentionOptions& o, index_t d) {
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
  std::ostringstream os;
  if (sh.batch < 1 || sh.heads < 1 || sh.m < 1 || sh.n < 1 || sh.d < 1 || sh.dv < 1) {
    os << "attention: expected non-empty inputs, got (batch, heads) = (" << sh.batch << ", " << sh.heads
       << "), " << sh.m << " queries, " << sh.n << " keys, d = " << sh.d << ", dv = " << sh.dv;
    detail::invalid(os.str());
  }
  const index_t pairs = checked_elements({sh.batch, sh.heads}, "attention (batch, heads)");
  checked_elements({pairs, std::max(sh.m, sh.n), std::max(sh.d, sh.dv)}, "attention inputs");
}

// Throws unless `sel` is one well-formed selection for `sh`.
void check_selection(const AttentionShape& sh, const Selection& sel) {
  std::ostringstream os;
  if (sel.batch != sh.batch || sel.heads != sh.heads || sel.m != sh.m || sel.n != sh.n) {
    os << "selection: made for (batch, heads) = (" << sel.batch << ", " << sel.heads << "), " << sel.m
       << " queries and " << sel.n << " keys, used with (" << sh.batch << ", " << sh.heads << "), " << sh.m
       << " queries and " << sh.n << " keys";
    detail::invalid(os.str());
  }
  const index_t pairs = sel.pairs();
  if (sel.window < -1) detail::invalid("selection: window must be >= -1");
  if (sel.all_keys && (!sel.shared_keys.empty() || sel.window >= 0 || sel.top_k != 0))
    detail::invalid("selection: all keys excludes shared keys, a window and per-query keys");
  if (!sel.shared_keys.empty() && static_cast<index_t>(sel.shared_keys.size()) != pairs) {
    os << "selection: expected a shared key set per pair (" << pairs << ") or none, got " << sel.shared_keys.size();
    detail::invalid(os.str());
  }
  for (const auto& keys : sel.shared_keys)
    for (std::size_t a = 0; a < keys.size(); ++a)
      if (keys[a] < 0 || keys[a] >= sel.n || (a > 0 && keys[a] <= keys[a - 1]))
        detail::invalid("selection: shared keys must be ascending, distinct and in [0, n)");
  if (sel.top_k == 0) {
    if (!sel.query_keys.empty()) detail::invalid("selection: per-query keys without a top_k");
    return;
  }
  if (sel.top_k < 0 || sel.top_k > sel.n || static_cast<index_t>(sel.query_keys.size()) != pairs * sel.m * sel.top_k)
    detail::invalid("selection: per-query keys must be (pairs, m, top_k) with 1 <= top_k <= n");
  // Each query's own keys: distinct, in range (or -1), and neither shared keys nor in its window.
  std::vector<index_t> stamp(static_cast<std::size_t>(sel.n), -1);
  for (index_t h = 0; h < pairs; ++h) {
    std::vector<char> shared(static_cast<std::size_t>(sel.n), 0);
    if (!sel.shared_keys.empty())
      for (index_t j : sel.shared_keys[h]) shared[j] = 1;
    for (index_t i = 0; i < sel.m; ++i) {
      const index_t row = h * sel.m + i;
      for (index_t a = 0; a < sel.top_k; ++a) {
        const index_t j = sel.query_keys[row * sel.top_k + a];
        if (j == -1) continue;
        if (j < 0 || j >= sel.n || stamp[j] == row)
          detail::invalid("selection: each query's keys must be distinct and in [0, n) (-1 for an unused slot)");
        if (shared[j] || (sel.window >= 0 && std::abs(i - j) <= sel.window))
          detail::invalid("selection: a query's own keys must not repeat its shared keys or its window");
        stamp[j] = row;
      }
    }
  }
}

// What both directions share: sizes, kernel, inputs, the gathered shared keys and the
// membership flags that keep a shared key out of the window band.
template <class T>
struct Ctx {
  AttentionShape sh;
  const Selection& sel;
  Fn<T> fn;
  const T *q, *k, *v;
  std::vector<std::vector<T>> ks, vs;
  std::vector<std::vector<char>> member;

  const T* Q(index_t h) const { return q + h * sh.m * sh.d; }
  const T* K(index_t h) const { return k + h * sh.n * sh.d; }
  const T* V(index_t h) const { return v + h * sh.n * sh.dv; }
  bool has_shared() const { return !sel.shared_keys.empty(); }
  index_t tiles() const { return (sh.m + kRows - 1) / kRows; }
  // Keys a query attends (for the work estimate).
  double keys_per_query() const {
    if (sel.all_keys) return static_cast<double>(sh.n);
    double u = 0.0;
    for (const auto& s : sel.shared_keys) u += static_cast<double>(s.size());
    const double band = sel.window >= 0 ? 2.0 * static_cast<double>(sel.window) + 1.0 : 0.0;
    return u / static_cast<double>(sel.pairs()) + band + static_cast<double>(sel.top_k);
  }
  double flops() const {
    return 4.0 * static_cast<double>(sel.pairs()) * static_cast<double>(sh.m) * keys_per_query() *
           static_cast<double>(sh.d + sh.dv);
  }
};

template <class T>
Ctx<T> make_ctx(const AttentionShape& sh, const Selection& sel, const AttentionOptions& o, const T* q,
                const T* k, const T* v) {
  check_shape(sh);
  check_selection(sh, sel);
  if (!q || !k || !v) detail::invalid("attention: null data pointer for queries, keys or values");
  const index_t pairs = sel.pairs();
  if (!finite(q, pairs * sh.m * sh.d)) detail::invalid("queries: expected finite values (found NaN or Inf)");
  if (!finite(k, pairs * sh.n * sh.d)) detail::invalid("keys: expected finite values (found NaN or Inf)");
  if (!finite(v, pairs * sh.n * sh.dv)) detail::invalid("values: expected finite values (found NaN or Inf)");
  Ctx<T> c{sh, sel, make_fn<T>(o, sh.d), q, k, v, {}, {}, {}};
  if (sel.all_keys) return c;
  c.ks.resize(static_cast<std::size_t>(pairs));
  c.vs.resize(static_cast<std::size_t>(pairs));
  if (sel.window >= 0) c.member.resize(static_cast<std::size_t>(pairs));
  for (index_t h = 0; h < pairs; ++h) {
    static const std::vector<index_t> none;
    const auto& keys = c.has_shared() ? sel.shared_keys[h] : none;
    const index_t u = static_cast<index_t>(keys.size());
    c.ks[h].resize(static_cast<std::size_t>(u * sh.d));
    c.vs[h].resize(static_cast<std::size_t>(u * sh.dv));
    for (index_t a = 0; a < u; ++a) {
      std::copy_n(c.K(h) + keys[a] * sh.d, sh.d, c.ks[h].data() + a * sh.d);
      std::copy_n(c.V(h) + keys[a] * sh.dv, sh.dv, c.vs[h].data() + a * sh.dv);
    }
    if (sel.window >= 0) {
      c.member[h].assign(static_cast<std::size_t>(sh.n), 0);
      for (index_t j : keys) c.member[h][j] = 1;
    }
  }
  return c;
}

// A block of keys met by a query tile: c keys (rows of kb / vb); band >= 0 is the index of the
// first key of a window-band block (masked per query), -1 for a block every query sees.
template <class T>
struct Block {
  const T *kb, *vb;
  index_t c, band;
};

// Calls f(block) for each block of keys that queries i0 .. i0 + rows - 1 of pair h attend.
template <class T, class F>
void for_each_block(const Ctx<T>& c, index_t h, index_t i0, index_t rows, F&& f) {
  const index_t d = c.sh.d, dv = c.sh.dv;
  if (c.sel.all_keys) {
    for (index_t j0 = 0; j0 < c.sh.n; j0 += kCols)
      f(Block<T>{c.K(h) + j0 * d, c.V(h) + j0 * dv, std::min(kCols, c.sh.n - j0), -1});
    return;
  }
  const index_t u = static_cast<index_t>(c.ks[h].size()) / d;
  for (index_t a0 = 0; a0 < u; a0 += kCols)
    f(Block<T>{c.ks[h].data() + a0 * d, c.vs[h].data() + a0 * dv, std::min(kCols, u - a0), -1});
  const index_t w = c.sel.window;
  if (w < 0) return;
  const index_t j1 = std::min(c.sh.n, i0 + rows + w);
  for (index_t j0 = std::max<index_t>(0, i0 - w); j0 < j1; j0 += kCols)
    f(Block<T>{c.K(h) + j0 * d, c.V(h) + j0 * dv, std::min(kCols, j1 - j0), j0});
}

// Per-thread buffers of one tile: logits, weights and their gradients, accumulators, and one
// query's own keys (their indices, logits and g).
template <class T>
struct Workspace {
  std::vector<T> s, p, ds, acc, dkb, dvb;
  std::vector<double> l;
  std::vector<T> mx;
  std::vector<index_t> own;
  std::vector<T> os, og, op, kg, vg;  // own keys: logits, g, weights or dP, gathered K and V rows
  Workspace(const AttentionShape& sh, index_t top_k)
      : s(kRows * kCols), p(kRows * kCols), ds(kRows * kCols), acc(static_cast<std::size_t>(kRows * sh.dv)),
        dkb(static_cast<std::size_t>(kCols * sh.d)), dvb(static_cast<std::size_t>(kCols * sh.dv)), l(kRows),
        mx(kRows), own(static_cast<std::size_t>(top_k)), os(own.size()), og(own.size()), op(own.size()),
        kg(static_cast<std::size_t>(top_k * sh.d)), vg(static_cast<std::size_t>(top_k * sh.dv)) {}
};

constexpr auto kNo = CblasNoTrans;
constexpr auto kTr = CblasTrans;

// ws.s <- scale Q_tile K_b^T; ws.p <- g(s), with -inf where the band mask excludes a key.
template <class T>
void logits(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, const Block<T>& b) {
  detail::gemm(kNo, kTr, rows, b.c, c.sh.d, c.fn.scale, c.Q(h) + i0 * c.sh.d, c.sh.d, b.kb, c.sh.d, T(0),
               ws.s.data(), b.c);
  const index_t w = c.sel.window;
  for (index_t r = 0; r < rows; ++r) {
    const T* s = ws.s.data() + r * b.c;
    T* g = ws.p.data() + r * b.c;
    for (index_t a = 0; a < b.c; ++a) g[a] = c.fn.g(s[a]);
    if (b.band < 0) continue;
    const index_t i = i0 + r;
    const char* member = c.member.empty() ? nullptr : c.member[h].data();
    for (index_t a = 0; a < b.c; ++a) {
      const index_t j = b.band + a;
      if (j < i - w || j > i + w || (member && member[j])) g[a] = -std::numeric_limits<T>::infinity();
    }
  }
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
  for_each_block(c, h, i0, rows, [&](const Block<T>& b) {
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

[[noreturn]] void overflow(const char* what) {
  detail::invalid(std::string("attention: the ") + what +
                  " overflow the floating-point type; rescale queries, keys or values (or pass a smaller scale)");
}

}  // namespace

template <class T>
void selected_attention_forward(const AttentionShape& sh, const Selection& sel, const AttentionOptions& o,
                                const T* q, const T* k, const T* v, T* out, T* stat) {
  const Ctx<T> c = make_ctx(sh, sel, o, q, k, v);
  if (!out || !stat) detail::invalid("attention: null output or statistics buffer");
  const index_t tiles = c.tiles(), pairs = sel.pairs();
  detail::parallel_tasks(pairs * tiles, c.flops() / 2.0, [&] { return Workspace<T>(sh, sel.top_k); },
                         [&](index_t t, Workspace<T>& ws) {
                           const index_t h = t / tiles, i0 = (t % tiles) * kRows;
                           forward_tile(c, ws, h, i0, std::min(kRows, sh.m - i0), out, stat);
                         });
  bool ok = finite(out, pairs * sh.m * sh.dv);
  for (index_t i = 0; i < pairs * sh.m; ++i) ok &= !std::isnan(stat[i]) && stat[i] != -std::numeric_limits<T>::infinity();
  if (!ok) overflow("scaled logits or the weighted values");
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
  for_each_block(c, h, i0, rows, [&](const Block<T>& b) {
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

// A block of keys whose dK and dV one task owns: pair h, keys (shared-set positions a0 .. or key
// indices j0 .. in K), met by the queries qlo .. qhi - 1.
struct KeyTask {
  index_t h, first, c;
  bool gathered;  // shared-set positions (else key indices)
  index_t qlo, qhi;
};

template <class T>
std::vector<KeyTask> key_tasks(const Ctx<T>& c) {
  std::vector<KeyTask> tasks;
  const index_t n = c.sh.n, m = c.sh.m, w = c.sel.window;
  for (index_t h = 0; h < c.sel.pairs(); ++h) {
    if (c.sel.all_keys) {
      for (index_t j0 = 0; j0 < n; j0 += kCols) tasks.push_back({h, j0, std::min(kCols, n - j0), false, 0, m});
      continue;
    }
    const index_t u = c.has_shared() ? static_cast<index_t>(c.sel.shared_keys[h].size()) : 0;
    for (index_t a0 = 0; a0 < u; a0 += kCols) tasks.push_back({h, a0, std::min(kCols, u - a0), true, 0, m});
    if (w < 0) continue;
    for (index_t j0 = 0; j0 < n; j0 += kCols) {
      const index_t cc = std::min(kCols, n - j0);
      const index_t lo = std::max<index_t>(0, j0 - w), hi = std::min(m, j0 + cc + w);
      if (lo < hi) tasks.push_back({h, j0, cc, false, lo, hi});
    }
  }
  return tasks;
}

template <class T>
void dkv_block(const Ctx<T>& c, Workspace<T>& ws, const KeyTask& t, const T* stat, const T* dout,
               const T* delta, T* dk, T* dv) {
  const index_t d = c.sh.d, dvw = c.sh.dv, h = t.h;
  const Block<T> b = t.gathered ? Block<T>{c.ks[h].data() + t.first * d, c.vs[h].data() + t.first * dvw, t.c, -1}
                     : Block<T>{c.K(h) + t.first * d, c.V(h) + t.first * dvw, t.c, c.sel.all_keys ? -1 : t.first};
  std::fill_n(ws.dkb.begin(), t.c * d, T(0));
  std::fill_n(ws.dvb.begin(), t.c * dvw, T(0));
  for (index_t i0 = t.qlo; i0 < t.qhi; i0 += kRows) {
    const index_t rows = std::min(kRows, t.qhi - i0);
    block_grads(c, ws, h, i0, rows, b, stat, dout, delta);
    detail::gemm(kTr, kNo, t.c, dvw, rows, T(1), ws.p.data(), t.c, dout + (h * c.sh.m + i0) * dvw, dvw, T(1),
                 ws.dvb.data(), dvw);
    detail::gemm(kTr, kNo, t.c, d, rows, c.fn.scale, ws.ds.data(), t.c, c.Q(h) + i0 * d, d, T(1), ws.dkb.data(), d);
  }
  // Each key row belongs to one task: a shared key to its set's block, any other to its band block.
  for (index_t a = 0; a < t.c; ++a) {
    const index_t j = t.gathered ? c.sel.shared_keys[h][t.first + a] : t.first + a;
    if (!t.gathered && !c.member.empty() && c.member[h][j]) continue;
    if (dk) std::copy_n(ws.dkb.data() + a * d, d, dk + (h * c.sh.n + j) * d);
    if (dv) std::copy_n(ws.dvb.data() + a * dvw, dvw, dv + (h * c.sh.n + j) * dvw);
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

template <class T>
void selected_attention_backward(const AttentionShape& sh, const Selection& sel, const AttentionOptions& o,
                                 const T* q, const T* k, const T* v, const T* out, const T* stat, const T* dout,
                                 T* dq, T* dk, T* dv) {
  const Ctx<T> c = make_ctx(sh, sel, o, q, k, v);
  const index_t pairs = sel.pairs(), rows = pairs * sh.m;
  if (!out || !stat || !dout) detail::invalid("attention backward: null output, statistics or output gradient");
  if (!finite(dout, rows * sh.dv)) detail::invalid("output gradient: expected finite values (found NaN or Inf)");
  if (!finite(out, rows * sh.dv)) detail::invalid("attention backward: the saved output is not finite");
  std::vector<T> delta(static_cast<std::size_t>(rows));
  for (index_t i = 0; i < rows; ++i) {
    if (std::isnan(stat[i])) detail::invalid("attention backward: the saved row statistics contain NaN");
    T s = 0;
    for (index_t x = 0; x < sh.dv; ++x) s += dout[i * sh.dv + x] * out[i * sh.dv + x];
    delta[i] = s;
  }
  const auto make = [&] { return Workspace<T>(sh, sel.top_k); };
  const index_t tiles = c.tiles();
  if (dq)
    detail::parallel_tasks(pairs * tiles, 0.6 * c.flops(), make, [&](index_t t, Workspace<T>& ws) {
      const index_t h = t / tiles, i0 = (t % tiles) * kRows;
      dq_tile(c, ws, h, i0, std::min(kRows, sh.m - i0), stat, dout, delta.data(), dq);
    });
  if (dk || dv) {
    if (dk) std::fill_n(dk, pairs * sh.n * sh.d, T(0));
    if (dv) std::fill_n(dv, pairs * sh.n * sh.dv, T(0));
    const std::vector<KeyTask> tasks = key_tasks(c);
    detail::parallel_tasks(static_cast<index_t>(tasks.size()), 0.8 * c.flops(), make,
                           [&](index_t t, Workspace<T>& ws) { dkv_block(c, ws, tasks[t], stat, dout, delta.data(), dk, dv); });
    if (sel.top_k > 0) own_keys_dkv(c, stat, dout, delta.data(), dk, dv);
  }
  const bool ok = (!dq || finite(dq, rows * sh.d)) && (!dk || finite(dk, pairs * sh.n * sh.d)) &&
                  (!dv || finite(dv, pairs * sh.n * sh.dv));
  if (!ok) overflow("gradients");
}

template void selected_attention_forward<float>(const AttentionShape&, const Selection&, const AttentionOptions&,
                                                const float*, const float*, const float*, float*, float*);
template void selected_attention_forward<double>(const AttentionShape&, const Selection&, const AttentionOptions&,
                                                 const double*, const double*, const double*, double*, double*);
template void selected_attention_backward<float>(const AttentionShape&, const Selection&, const AttentionOptions&,
                                                 const float*, const float*, const float*, const float*, const float*,
                                                 const float*, float*, float*, float*);
template void selected_attention_backward<double>(const AttentionShape&, const Selection&, const AttentionOptions&,
                                                  const double*, const double*, const double*, const double*,
                                                  const double*, const double*, double*, double*, double*);

}  // namespace levattn
