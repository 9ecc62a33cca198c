// Attention over a fixed selection and its gradients, templated on the scalar. Each query tile
// meets its keys as blocks (shared keys gathered, the window band masked, or every key); the
// forward runs an online log-sum-exp over the blocks, the backward recomputes each block's
// weights from the saved row statistics. dQ is summed per query tile, dK and dV per key block,
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
  const bool shared = !sel.all_keys && sel.top_k == 0;
  if (sel.window < -1) detail::invalid("selection: window must be >= -1");
  if (!shared && (!sel.shared_keys.empty() || sel.window >= 0))
    detail::invalid("selection: shared keys and a window belong to the shared form only");
  if (sel.all_keys && sel.top_k != 0) detail::invalid("selection: all keys and per-query keys together");
  if (shared && static_cast<index_t>(sel.shared_keys.size()) != pairs) {
    os << "selection: expected a shared key set per pair (" << pairs << "), got " << sel.shared_keys.size();
    detail::invalid(os.str());
  }
  for (const auto& keys : sel.shared_keys)
    for (std::size_t a = 0; a < keys.size(); ++a)
      if (keys[a] < 0 || keys[a] >= sel.n || (a > 0 && keys[a] <= keys[a - 1]))
        detail::invalid("selection: shared keys must be ascending, distinct and in [0, n)");
  if (sel.top_k == 0) return;
  if (sel.top_k < 0 || sel.top_k > sel.n || static_cast<index_t>(sel.query_keys.size()) != pairs * sel.m * sel.top_k)
    detail::invalid("selection: per-query keys must be (pairs, m, top_k) with 1 <= top_k <= n");
  std::vector<index_t> stamp(static_cast<std::size_t>(sel.n), -1);
  for (index_t row = 0; row < pairs * sel.m; ++row)
    for (index_t a = 0; a < sel.top_k; ++a) {
      const index_t j = sel.query_keys[row * sel.top_k + a];
      if (j < 0 || j >= sel.n || stamp[j] == row)
        detail::invalid("selection: each query's keys must be distinct and in [0, n)");
      stamp[j] = row;
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
  bool shared() const { return !sel.all_keys && sel.top_k == 0; }
  index_t tiles() const { return (sh.m + kRows - 1) / kRows; }
  // Keys a query attends (for the work estimate).
  double keys_per_query() const {
    if (sel.all_keys) return static_cast<double>(sh.n);
    if (sel.top_k > 0) return static_cast<double>(sel.top_k);
    double u = 0.0;
    for (const auto& s : sel.shared_keys) u += static_cast<double>(s.size());
    return u / static_cast<double>(sel.pairs()) + 2.0 * static_cast<double>(std::max<index_t>(sel.window, 0)) + 1.0;
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
  if (!c.shared()) return c;
  c.ks.resize(static_cast<std::size_t>(pairs));
  c.vs.resize(static_cast<std::size_t>(pairs));
  if (sel.window >= 0) c.member.resize(static_cast<std::size_t>(pairs));
  for (index_t h = 0; h < pairs; ++h) {
    const auto& keys = sel.shared_keys[h];
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
  const index_t u = static_cast<index_t>(c.sel.shared_keys[h].size());
  for (index_t a0 = 0; a0 < u; a0 += kCols)
    f(Block<T>{c.ks[h].data() + a0 * d, c.vs[h].data() + a0 * dv, std::min(kCols, u - a0), -1});
  const index_t w = c.sel.window;
  if (w < 0) return;
  const index_t j1 = std::min(c.sh.n, i0 + rows + w);
  for (index_t j0 = std::max<index_t>(0, i0 - w); j0 < j1; j0 += kCols)
    f(Block<T>{c.K(h) + j0 * d, c.V(h) + j0 * dv, std::min(kCols, j1 - j0), j0});
}

// Per-thread buffers of one tile: logits, weights and their gradients, accumulators.
template <class T>
struct Workspace {
  std::vector<T> s, p, ds, acc, dkb, dvb;
  std::vector<double> l;
  std::vector<T> mx;
  explicit Workspace(const AttentionShape& sh)
      : s(kRows * kCols), p(kRows * kCols), ds(kRows * kCols), acc(static_cast<std::size_t>(kRows * sh.dv)),
        dkb(static_cast<std::size_t>(kCols * sh.d)), dvb(static_cast<std::size_t>(kCols * sh.dv)), l(kRows),
        mx(kRows) {}
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
  for (index_t r = 0; r < rows; ++r) {
    T* o = out + (h * c.sh.m + i0 + r) * dv;
    const double l = ws.l[r];
    const bool empty = !(l > 0.0);
    for (index_t x = 0; x < dv; ++x) o[x] = empty ? T(0) : static_cast<T>(ws.acc[r * dv + x] / l);
    stat[h * c.sh.m + i0 + r] =
        empty ? std::numeric_limits<T>::infinity() : static_cast<T>(static_cast<double>(ws.mx[r]) + std::log(l));
  }
}

// One query's per-query keys: s (k logits) and their weights exp(g - L) into w.
template <class T>
void query_weights(const Ctx<T>& c, index_t h, index_t i, T L, T* s, T* w) {
  const index_t kk = c.sel.top_k, d = c.sh.d;
  const index_t* keys = c.sel.query_keys.data() + (h * c.sh.m + i) * kk;
  const T* qi = c.Q(h) + i * d;
  for (index_t a = 0; a < kk; ++a) {
    const T* kj = c.K(h) + keys[a] * d;
    T dot = 0;
    for (index_t x = 0; x < d; ++x) dot += qi[x] * kj[x];
    s[a] = c.fn.scale * dot;
    w[a] = c.fn.g(s[a]);
  }
  if (std::isnan(L)) {  // the forward: L from the logits
    const T mx = *std::max_element(w, w + kk);
    double sum = 0.0;
    if (mx != -std::numeric_limits<T>::infinity())
      for (index_t a = 0; a < kk; ++a) sum += std::exp(static_cast<double>(w[a] - mx));
    L = sum > 0.0 ? static_cast<T>(static_cast<double>(mx) + std::log(sum)) : std::numeric_limits<T>::infinity();
    s[kk] = L;
  }
  for (index_t a = 0; a < kk; ++a) w[a] = std::exp(w[a] - L);
}

template <class T>
void forward_topk(const Ctx<T>& c, Workspace<T>& ws, index_t h, index_t i0, index_t rows, T* out, T* stat) {
  const index_t kk = c.sel.top_k, dv = c.sh.dv;
  ws.s.resize(std::max<std::size_t>(ws.s.size(), static_cast<std::size_t>(kk + 1)));
  ws.p.resize(std::max<std::size_t>(ws.p.size(), static_cast<std::size_t>(kk)));
  for (index_t i = i0; i < i0 + rows; ++i) {
    query_weights(c, h, i, std::numeric_limits<T>::quiet_NaN(), ws.s.data(), ws.p.data());
    stat[h * c.sh.m + i] = ws.s[kk];
    T* o = out + (h * c.sh.m + i) * dv;
    std::fill_n(o, dv, T(0));
    const index_t* keys = c.sel.query_keys.data() + (h * c.sh.m + i) * kk;
    for (index_t a = 0; a < kk; ++a) {
      const T* vj = c.V(h) + keys[a] * dv;
      for (index_t x = 0; x < dv; ++x) o[x] += ws.p[a] * vj[x];
    }
  }
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
  detail::parallel_tasks(pairs * tiles, c.flops() / 2.0, [&] { return Workspace<T>(sh); },
                         [&](index_t t, Workspace<T>& ws) {
                           const index_t h = t / tiles, i0 = (t % tiles) * kRows, rows = std::min(kRows, sh.m - i0);
                           if (sel.top_k > 0) forward_topk(c, ws, h, i0, rows, out, stat);
                           else forward_tile(c, ws, h, i0, rows, out, stat);
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
    const index_t u = static_cast<index_t>(c.sel.shared_keys[h].size());
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

// Per-query keys: dS entry by entry. dq by query; dk and dv by key through the transposed lists.
template <class T>
void topk_backward(const Ctx<T>& c, const T* stat, const T* dout, const T* delta, T* dq, T* dk, T* dv) {
  const index_t kk = c.sel.top_k, d = c.sh.d, dvw = c.sh.dv, m = c.sh.m, n = c.sh.n, pairs = c.sel.pairs();
  // P and dS of every selected entry, (pairs, m, k): the per-query form stores m k indices already.
  std::vector<T> P(c.sel.query_keys.size()), DS(c.sel.query_keys.size());
  detail::parallel_tasks(pairs * m, c.flops(), [&] { return std::vector<T>(static_cast<std::size_t>(kk + 1)); },
                         [&](index_t row, std::vector<T>& s) {
                           const index_t h = row / m, i = row % m;
                           T* p = P.data() + row * kk;
                           query_weights(c, h, i, stat[row], s.data(), p);
                           const index_t* keys = c.sel.query_keys.data() + row * kk;
                           for (index_t a = 0; a < kk; ++a) {
                             const T* vj = c.V(h) + keys[a] * dvw;
                             const T* go = dout + row * dvw;
                             T dp = 0;
                             for (index_t x = 0; x < dvw; ++x) dp += go[x] * vj[x];
                             DS[row * kk + a] = p[a] == T(0) ? T(0) : p[a] * c.fn.dg(s[a]) * (dp - delta[row]);
                           }
                           if (!dq) return;
                           T* g = dq + row * d;
                           std::fill_n(g, d, T(0));
                           for (index_t a = 0; a < kk; ++a) {
                             const T* kj = c.K(h) + keys[a] * d;
                             for (index_t x = 0; x < d; ++x) g[x] += c.fn.scale * DS[row * kk + a] * kj[x];
                           }
                         });
  if (!dk && !dv) return;
  detail::parallel_tasks(pairs, c.flops(), [] { return std::vector<index_t>(); },
                         [&](index_t h, std::vector<index_t>& start) {
                           // Entries grouped by key (counting sort, queries ascending within a key).
                           start.assign(static_cast<std::size_t>(n + 1), 0);
                           const index_t* keys = c.sel.query_keys.data() + h * m * kk;
                           for (index_t e = 0; e < m * kk; ++e) ++start[keys[e] + 1];
                           for (index_t j = 0; j < n; ++j) start[j + 1] += start[j];
                           std::vector<index_t> fill(start.begin(), start.end() - 1), entry(static_cast<std::size_t>(m * kk));
                           for (index_t e = 0; e < m * kk; ++e) entry[fill[keys[e]]++] = e;
                           for (index_t j = 0; j < n; ++j) {
                             T* gk = dk ? dk + (h * n + j) * d : nullptr;
                             T* gv = dv ? dv + (h * n + j) * dvw : nullptr;
                             if (gk) std::fill_n(gk, d, T(0));
                             if (gv) std::fill_n(gv, dvw, T(0));
                             for (index_t x = start[j]; x < start[j + 1]; ++x) {
                               const index_t e = h * m * kk + entry[x], i = entry[x] / kk;
                               const T* qi = c.Q(h) + i * d;
                               const T* go = dout + (h * m + i) * dvw;
                               if (gk) for (index_t y = 0; y < d; ++y) gk[y] += c.fn.scale * DS[e] * qi[y];
                               if (gv) for (index_t y = 0; y < dvw; ++y) gv[y] += P[e] * go[y];
                             }
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
  if (sel.top_k > 0) {
    topk_backward(c, stat, dout, delta.data(), dq, dk, dv);
  } else {
    const auto make = [&] { return Workspace<T>(sh); };
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
    }
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
