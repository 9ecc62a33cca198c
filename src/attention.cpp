// Attention driver: validates, builds each head's selection, then runs the online kernel over
// (head, query block) tasks in parallel.
#include "levattn/attention.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>

#include "detail/cluster.hpp"
#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "detail/selection.hpp"
#include "detail/validate.hpp"
#include "kernels/online_attention.hpp"
#include "levattn/causal.hpp"
#include "levattn/lewis_weights.hpp"
#include "levattn/selected_attention.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

ConstMatrix flat(const Tensor4Ref& t) { return {t.data, t.batch * t.heads * t.rows, t.cols}; }

void check_shapes(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V) {
  std::ostringstream os;
  const std::pair<const Tensor4Ref*, const char*> args[] = {{&Q, "queries"}, {&K, "keys"}, {&V, "values"}};
  for (const auto& [t, name] : args) {
    if (t->rows < 1 || t->cols < 1) {
      os << name << ": expected a non-empty array, got " << t->rows << " rows of " << t->cols
         << " columns";
      detail::invalid(os.str());
    }
  }
  if (!Q.data || !K.data || !V.data) detail::invalid("attention: null data pointer for queries, keys or values");
  if (Q.batch < 1 || Q.heads < 1) {
    os << "queries: expected batch >= 1 and heads >= 1, got (" << Q.batch << ", " << Q.heads << ")";
    detail::invalid(os.str());
  }
  // Grouped-query attention: fewer key/value heads than query heads, dividing them.
  if (K.batch != Q.batch || V.batch != Q.batch || V.heads != K.heads || K.heads < 1 || Q.heads % K.heads != 0) {
    os << "keys/values: expected the queries' batch " << Q.batch << " and a number of heads dividing the queries' "
       << Q.heads << " (the same for both), got keys (" << K.batch << ", " << K.heads << "), values (" << V.batch
       << ", " << V.heads << ")";
    detail::invalid(os.str());
  }
  if (K.cols != Q.cols) {
    os << "keys: expected " << Q.cols << " columns (the queries' dimension d), got " << K.cols;
    detail::invalid(os.str());
  }
  if (V.rows != K.rows) {
    os << "values: expected " << K.rows << " rows (one per key), got " << V.rows;
    detail::invalid(os.str());
  }
}

// Names the first non-finite entry of the inputs (queries, then keys, then values) and throws.
[[noreturn]] void report_non_finite(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V) {
  detail::require_finite_matrix(flat(Q), "queries");
  detail::require_finite_matrix(flat(K), "keys");
  detail::require_finite_matrix(flat(V), "values");
  throw Error(ErrorKind::internal, "attention: a non-finite input was not found again");
}

// Replaces an adaptive budget by the top_k it gives for n keys.
AttentionOptions resolve_budget(const AttentionOptions& options, index_t n) {
  AttentionOptions o = options;
  if (o.budget_alpha == 0.0 && o.budget_exponent == 0.0) return o;
  if (o.top_k != 0) detail::invalid("budget: give either top_k or an adaptive budget, not both");
  if (o.select != Select::topk && o.select != Select::leverage && o.select != Select::random &&
      o.select != Select::cluster)
    detail::invalid("budget: applies to select topk, leverage, random and cluster only");
  o.top_k = adaptive_budget(n, o.budget_alpha, o.budget_exponent);
  o.budget_alpha = o.budget_exponent = 0.0;
  return o;
}

void check_options(const AttentionOptions& o) {
  std::ostringstream os;
  detail::check_kernel(o);
  if (o.window < -1) {
    os << "window: expected an integer >= 0 (or -1 for none), got " << o.window;
    detail::invalid(os.str());
  }
  if (o.sinks < 0) {
    os << "sinks: expected an integer >= 0, got " << o.sinks;
    detail::invalid(os.str());
  }
  const bool local = o.window >= 0 || o.sinks > 0;
  if (o.eps != 0.0 && o.select != Select::leverage && o.select != Select::cluster)
    detail::invalid("eps: applies to select leverage and cluster only, got select " + to_string(o.select));
  // Options the chosen selection would not read are an error, not silently dropped.
  const bool cluster_set = o.clusters != 0 || o.probe != 0 || o.cluster_iterations != AttentionOptions{}.cluster_iterations;
  if (o.select != Select::cluster && cluster_set)
    detail::invalid("clusters, probe, iterations: apply to select cluster only, got select " + to_string(o.select));
  if (o.top_k != 0 && (o.select == Select::full || o.select == Select::window))
    detail::invalid("top_k: select " + to_string(o.select) + " takes no key budget");
  switch (o.select) {
    case Select::full:
    case Select::topk:
      if (local)
        detail::invalid("select " + to_string(o.select) +
                        ": window and sinks combine only with leverage, random, window or cluster");
      if (o.select == Select::topk && o.top_k < 1) {
        os << "top_k: select topk needs a budget >= 1, got " << o.top_k;
        detail::invalid(os.str());
      }
      break;
    case Select::leverage:
      if ((o.top_k > 0) == (o.eps > 0.0))
        detail::invalid("select leverage: give exactly one of top_k >= 1 or eps in (0, 1]");
      if (o.eps != 0.0 || o.top_k <= 0) detail::require_eps(o.eps);
      if (o.top_k < 0) detail::invalid("top_k: expected an integer >= 1");
      break;
    case Select::random:
      if (o.top_k < 1) {
        os << "top_k: select random needs a budget >= 1, got " << o.top_k;
        detail::invalid(os.str());
      }
      break;
    case Select::window:
      if (!local) detail::invalid("select window: give a window >= 0 or sinks >= 1");
      break;
    case Select::cluster:
      if (o.top_k < 1) {
        os << "top_k: select cluster needs a per-query budget >= 1, got " << o.top_k;
        detail::invalid(os.str());
      }
      if (o.eps != 0.0) detail::require_eps(o.eps);
      if (o.clusters < 0 || o.probe < 0 || o.cluster_iterations < 1) {
        os << "cluster: expected clusters >= 0, probe >= 0 (0: defaults) and iterations >= 1, got " << o.clusters
           << ", " << o.probe << ", " << o.cluster_iterations;
        detail::invalid(os.str());
      }
      break;
  }
  if (o.causal && o.select == Select::leverage) {
    if (o.top_k > 0)
      detail::invalid("causal leverage: give eps (each block's causal universal set); top_k keys by prefix score "
                      "cannot be kept exactly in one pass");
    if (o.kernel == Kernel::power && o.p != 2.0)
      detail::invalid("causal leverage: the causal sets are x^2 leverage scores; with the poly kernel p must be 2");
    if (o.leverage.method != ScoreMethod::exact) detail::invalid("causal leverage: needs exact scores (method exact)");
  }
}

// Query blocks of the fast path never straddle a causal block, so each uses one set.
static_assert(kCausalBlock % kernels::kQueryBlock == 0, "causal blocks must be whole query blocks");

// The keys shared by the queries of one head: one set, or (causal leverage) one per block of
// `segment` queries; each ascending.
struct HeadSelection {
  std::vector<std::vector<index_t>> sets;
  index_t segment = 0;
  const std::vector<index_t>& of(index_t i) const { return sets[static_cast<std::size_t>(segment > 0 ? i / segment : 0)]; }
};

// What every (batch, head) pair of one call shares: the resolved options, sizes and kernel.
struct Plan {
  AttentionOptions o;
  kernels::KernelParams params;
  index_t heads = 0, qheads = 0, m = 0, n = 0, d = 0, dv = 0;
  index_t group = 1;  // query heads per key/value head (grouped-query attention)

  // Pair h's slice of the queries, and of the keys or values it reads (its group's).
  ConstMatrix q_slice(const Tensor4Ref& Q, index_t h) const { return Q.slice(h / qheads, h % qheads); }
  ConstMatrix kv_slice(const Tensor4Ref& KV, index_t h) const { return KV.slice(h / qheads, h % qheads / group); }
  // Pair h's row of the key mask (n bytes), or null.
  const std::uint8_t* open_keys(index_t h) const { return o.key_mask ? o.key_mask + h / qheads * n : nullptr; }
  index_t window = -1;  // clamped: a window wider than both sequences sees everything
  index_t k_top = 0;    // topk budget, at most n
  bool shared = false;  // leverage, random or window: one key set per head
  index_t blocks = 0;   // query blocks per head
};

// Whether logits can overflow float32: they are bounded by |scale| d max|q_ij| max|k_ij|.
bool logits_can_overflow(double scale, index_t d, double max_q, double max_k) {
  const double bound = std::fabs(scale) * static_cast<double>(d) * max_q * max_k;
  return !(bound < 0.5 * static_cast<double>(std::numeric_limits<float>::max()));
}

// One pass over a (batch, head) pair's inputs, while they are about to be used: false if any
// entry is not finite; else sets `overflow` (whether its logit tiles need checking).
bool check_pair(const kernels::RowOps& ops, double scale, ConstMatrix Qh, ConstMatrix Kh, ConstMatrix Vh,
                bool& overflow) {
  const double q = detail::max_abs_or_non_finite(ops, Qh.data, Qh.rows * Qh.cols);
  const double k = detail::max_abs_or_non_finite(ops, Kh.data, Kh.rows * Kh.cols);
  if (q < 0 || k < 0 || detail::max_abs_or_non_finite(ops, Vh.data, Vh.rows * Vh.cols) < 0) return false;
  overflow = logits_can_overflow(scale, Qh.cols, q, k);
  return true;
}

Plan make_plan(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V, const AttentionOptions& options) {
  Plan pl;
  pl.o = resolve_budget(options, K.rows);
  check_options(pl.o);
  const AttentionOptions& o = pl.o;
  pl.heads = Q.batch * Q.heads;
  pl.qheads = Q.heads;
  pl.group = K.heads > 0 ? Q.heads / K.heads : 1;
  pl.m = Q.rows, pl.n = K.rows, pl.d = Q.cols, pl.dv = V.cols;
  if (o.causal && pl.m != pl.n) {
    std::ostringstream os;
    os << "causal: expected as many queries as keys (query i sees keys 0 .. i), got " << pl.m << " queries and "
       << pl.n << " keys";
    detail::invalid(os.str());
  }
  pl.params.kernel = o.kernel;
  pl.params.p = static_cast<float>(o.p);
  pl.params.ops = &kernels::active_row_ops();
  pl.params.scale = static_cast<float>(logit_scale(o, pl.d));
  pl.params.check_overflow = true;  // until the inputs are scanned
  pl.window = std::min(o.window, std::max(pl.m, pl.n));
  pl.k_top = std::min(o.top_k, pl.n);
  pl.shared = o.select == Select::leverage || o.select == Select::random || o.select == Select::window;
  pl.blocks = (pl.m + kernels::kQueryBlock - 1) / kernels::kQueryBlock;
  return pl;
}

// The data-independent fields of the selection a plan makes (select_keys fills in the rest).
Selection layout_of(const Plan& pl, index_t batch) {
  Selection sel;
  sel.batch = batch, sel.heads = pl.qheads, sel.m = pl.m, sel.n = pl.n;
  sel.all_keys = pl.o.select == Select::full;
  sel.causal = pl.o.causal;
  if (pl.shared || pl.o.select == Select::cluster) sel.window = pl.window;
  if (pl.o.select == Select::topk || pl.o.select == Select::cluster) sel.top_k = pl.k_top;
  if (pl.o.causal && pl.o.select == Select::leverage) sel.segment = kCausalBlock;
  return sel;
}

// keys <- keys (ascending) without the masked ones (open: n bytes, nullable), united with the
// sinks: the first `sinks` unmasked keys (0 .. sinks - 1 without a mask).
void add_sinks(std::vector<index_t>& keys, index_t sinks, const std::uint8_t* open) {
  if (open) keys.erase(std::remove_if(keys.begin(), keys.end(), [&](index_t j) { return !open[j]; }), keys.end());
  if (sinks <= 0) return;
  std::vector<index_t> merged, first;
  for (index_t j = 0; static_cast<index_t>(first.size()) < sinks; ++j)
    if (!open || open[j]) first.push_back(j);
  std::set_union(keys.begin(), keys.end(), first.begin(), first.end(), std::back_inserter(merged));
  keys.swap(merged);
}

// K with the masked rows zeroed: a zero key changes no other key's leverage score (nor the
// Gram) and scores 0 itself, so scores of this matrix are those of the unmasked keys alone.
DenseMatrix<float> without_masked(ConstMatrix K, const std::uint8_t* open) {
  DenseMatrix<float> z(K.rows, K.cols);
  for (index_t j = 0; j < K.rows; ++j)
    if (open[j]) std::copy_n(K.row(j), K.cols, z.data.data() + j * K.cols);
  return z;
}

// The shared key set of head h (leverage scores / Lewis bounds, or random, plus sinks), among
// the unmasked keys (open: n bytes, nullable).
std::vector<index_t> shared_keys(const AttentionOptions& o, ConstMatrix K, std::uint64_t stream,
                                 const std::uint8_t* open) {
  std::vector<index_t> keys;
  const index_t n_open = open ? static_cast<index_t>(std::count_if(open, open + K.rows, [](std::uint8_t x) { return x != 0; }))
                              : K.rows;
  if (n_open == 0) {
    // Every key masked (a padding-only sequence): nothing to select.
  } else if (o.select == Select::leverage || (o.select == Select::cluster && o.eps > 0.0)) {
    // |x|^p attention selects by its own sensitivity bounds (Lewis weights); softmax and x^2 by
    // leverage scores: one dispatcher for both (exact or sketched, by o.leverage). Cluster's
    // top_k is its per-query budget; its shared set is U_eps.
    const double p = o.kernel == Kernel::power ? o.p : 2.0;
    const DenseMatrix<float> zeroed = open ? without_masked(K, open) : DenseMatrix<float>();
    const LeverageScores s = sensitivity_bounds(open ? zeroed.view() : K, p, o.leverage);
    keys = (o.select == Select::leverage && o.top_k > 0 ? universal_set_top_k(s, std::min(o.top_k, n_open))
                                                         : universal_set(s, o.eps)).indices;
  } else if (o.select == Select::random) {
    // Drawn among the unmasked keys: the same draws as n_open keys without a mask.
    keys = detail::random_keys(n_open, o.top_k, detail::CounterRng(o.seed, detail::Purpose::random_selection, stream));
    if (open) {
      const std::vector<index_t> ids = detail::open_keys(K.rows, open);
      for (index_t& j : keys) j = ids[j];
    }
  }
  add_sinks(keys, std::min(o.sinks, n_open), open);
  return keys;
}

// The shared sets of head h: shared_keys, or with causal leverage each block's causal set plus
// the sinks.
HeadSelection select_head(const AttentionOptions& o, ConstMatrix Kh, index_t h, const std::uint8_t* open) {
  HeadSelection s;
  if (o.causal && o.select == Select::leverage) {
    const DenseMatrix<float> zeroed = open ? without_masked(Kh, open) : DenseMatrix<float>();
    s.sets = causal_universal_sets(open ? zeroed.view() : Kh, o.eps, kCausalBlock, o.leverage).shared_keys;
    s.segment = kCausalBlock;
    const index_t n_open = static_cast<index_t>(detail::open_keys(Kh.rows, open).size());
    for (auto& set : s.sets) add_sinks(set, std::min(o.sinks, n_open), open);
  } else {
    s.sets.push_back(shared_keys(o, Kh, static_cast<std::uint64_t>(h), open));
  }
  return s;
}

// Per-thread state of the attention pass.
struct Workspace {
  kernels::OnlineBlock blk;
  std::vector<float> gk, gv;  // gathered key and value rows (shared keys, topk)
  std::vector<float> tile;    // topk search
  std::vector<char> flags;    // window band: keys of the shared set
  explicit Workspace(const Plan& pl) : blk(pl.params, kernels::kQueryBlock, kernels::kKeyTile, pl.dv) {}
};

// Empty rows and keys attended, summed over the blocks of a task.
struct BlockStats {
  index_t empty = 0, non_finite = 0;
  double keys = 0.0;
  void add(const kernels::OnlineBlock::Rows& r) {
    empty += r.empty;
    non_finite += r.non_finite;
  }
};

constexpr float kMasked = -std::numeric_limits<float>::infinity();

// Masks the keys after each query in a tile of logits (rows x c) for keys j0 .. j0 + c - 1 and
// queries i0 ..; returns the entries left.
double mask_causal(float* tile, index_t rows, index_t c, index_t i0, index_t j0) {
  double kept = 0.0;
  for (index_t r = 0; r < rows; ++r) {
    const index_t seen = std::clamp<index_t>(i0 + r + 1 - j0, 0, c);
    std::fill(tile + r * c + seen, tile + (r + 1) * c, kMasked);
    kept += static_cast<double>(seen);
  }
  return kept;
}

BlockStats attend_full(const Plan& pl, Workspace& w, ConstMatrix Qh, ConstMatrix Kh, ConstMatrix Vh,
                       index_t i0, index_t rows, float* dst) {
  const index_t end = pl.o.causal ? std::min(pl.n, i0 + rows) : pl.n;
  BlockStats st;
  w.blk.begin(Qh.row(i0), Qh.ld, rows, pl.d);
  for (index_t c0 = 0; c0 < end; c0 += kernels::kKeyTile) {
    const index_t c = std::min(kernels::kKeyTile, end - c0);
    float* tile = w.blk.logits(Kh.row(c0), Kh.ld, c);
    st.keys += pl.o.causal && c0 + c > i0 + 1 ? mask_causal(tile, rows, c, i0, c0) : static_cast<double>(rows * c);
    w.blk.absorb(Vh.row(c0), Vh.ld, c);
  }
  st.add(w.blk.finish(dst, pl.dv));
  return st;
}

// The block's shared set (causal: its keys up to the block's last query, masked per row), then
// the band of keys any query of the block can see, masked per row to its own window minus the
// shared keys (already counted).
BlockStats attend_shared(const Plan& pl, Workspace& w, const HeadSelection& s, ConstMatrix Qh,
                         ConstMatrix Kh, ConstMatrix Vh, index_t i0, index_t rows, float* dst) {
  const std::vector<index_t>& keys = s.of(i0);
  const index_t window = pl.window, d = pl.d, dv = pl.dv, last = i0 + rows - 1;
  const bool causal = pl.o.causal;
  const index_t u = causal ? std::upper_bound(keys.begin(), keys.end(), last) - keys.begin()
                           : static_cast<index_t>(keys.size());
  BlockStats st;
  w.blk.begin(Qh.row(i0), Qh.ld, rows, d);
  w.gk.resize(static_cast<std::size_t>(kernels::kKeyTile * d));
  w.gv.resize(static_cast<std::size_t>(kernels::kKeyTile * dv));
  for (index_t c0 = 0; c0 < u; c0 += kernels::kKeyTile) {
    const index_t c = std::min(kernels::kKeyTile, u - c0);
    for (index_t a = 0; a < c; ++a) {
      std::copy_n(Kh.row(keys[c0 + a]), d, w.gk.data() + a * d);
      std::copy_n(Vh.row(keys[c0 + a]), dv, w.gv.data() + a * dv);
    }
    float* tile = w.blk.logits(w.gk.data(), d, c);
    if (causal && keys[c0 + c - 1] > i0) {
      for (index_t r = 0; r < rows; ++r) {
        const index_t seen = std::upper_bound(keys.begin() + c0, keys.begin() + c0 + c, i0 + r) - (keys.begin() + c0);
        std::fill(tile + r * c + seen, tile + (r + 1) * c, kMasked);
        st.keys += static_cast<double>(seen);
      }
    } else {
      st.keys += static_cast<double>(rows * c);
    }
    w.blk.absorb(w.gv.data(), dv, c);
  }
  if (window >= 0) {
    const index_t base = std::max<index_t>(0, i0 - window);
    index_t j0 = base, j1 = std::min(pl.n, causal ? last + 1 : last + 1 + window);
    w.flags.resize(static_cast<std::size_t>(std::max<index_t>(0, j1 - j0)));
    detail::mark_members(keys, j0, j1 - j0, w.flags.data());
    // Shared keys at the band's ends need no logits (a causal set holds its block's own keys).
    while (j1 > j0 && w.flags[j1 - 1 - base]) --j1;
    while (j0 < j1 && w.flags[j0 - base]) ++j0;
    for (index_t c0 = j0; c0 < j1; c0 += kernels::kKeyTile) {
      const index_t c = std::min(kernels::kKeyTile, j1 - c0);
      float* tile = w.blk.logits(Kh.row(c0), Kh.ld, c);
      for (index_t r = 0; r < rows; ++r) {
        const index_t i = i0 + r, hi = causal ? i : i + window;
        float* srow = tile + r * c;
        for (index_t a = 0; a < c; ++a) {
          const index_t j = c0 + a;
          if (j < i - window || j > hi || w.flags[j - base]) srow[a] = kMasked;
          else st.keys += 1.0;
        }
      }
      w.blk.absorb(Vh.row(c0), Vh.ld, c);
    }
  }
  st.add(w.blk.finish(dst, pl.dv));
  return st;
}

// Each query of the block over its own top_k keys (keys: rows x k_top, -1 for an unused slot),
// tile by tile.
BlockStats attend_topk(const Plan& pl, Workspace& w, const index_t* keys, ConstMatrix Qh,
                       ConstMatrix Kh, ConstMatrix Vh, index_t i0, index_t rows, float* dst) {
  const index_t k = pl.k_top, width = std::min(k, kernels::kKeyTile), d = pl.d, dv = pl.dv;
  w.gk.resize(static_cast<std::size_t>(width * d));
  w.gv.resize(static_cast<std::size_t>(width * dv));
  BlockStats st;
  for (index_t r = 0; r < rows; ++r) {
    const index_t* mine = keys + r * k;
    w.blk.begin(Qh.row(i0 + r), d, 1, d);
    for (index_t a = 0; a < k;) {
      index_t c = 0;
      for (; a < k && c < width; ++a) {
        if (mine[a] < 0) continue;
        std::copy_n(Kh.row(mine[a]), d, w.gk.data() + c * d);
        std::copy_n(Vh.row(mine[a]), dv, w.gv.data() + c * dv);
        ++c;
      }
      if (c == 0) break;
      w.blk.logits(w.gk.data(), d, c);
      w.blk.absorb(w.gv.data(), dv, c);
      st.keys += static_cast<double>(c);
    }
    st.add(w.blk.finish(dst + r * dv, dv));
  }
  return st;
}

// Everything attention() computes for query block b of head h (its selection made already).
struct Inputs {
  const Tensor4Ref &Q, &K, &V;
  float* out;
};

BlockStats run_block(const Plan& pl, Workspace& w, const Inputs& in, const HeadSelection* s,
                     index_t* top, index_t h, index_t b) {
  const ConstMatrix Qh = pl.q_slice(in.Q, h), Kh = pl.kv_slice(in.K, h), Vh = pl.kv_slice(in.V, h);
  const index_t i0 = b * kernels::kQueryBlock, rows = std::min(kernels::kQueryBlock, pl.m - i0);
  float* dst = in.out + (h * pl.m + i0) * pl.dv;
  if (pl.o.select == Select::full) return attend_full(pl, w, Qh, Kh, Vh, i0, rows, dst);
  if (pl.shared) return attend_shared(pl, w, *s, Qh, Kh, Vh, i0, rows, dst);
  index_t* keys = top + (h * pl.m + i0) * pl.k_top;
  detail::top_keys(pl.params, Qh, Kh, pl.k_top, i0, i0 + rows, keys, w.tile, pl.o.causal);
  return attend_topk(pl, w, keys, Qh, Kh, Vh, i0, rows, dst);
}

// Select::cluster's per-pair state: the shared keys (U_eps, sinks) and k-means clusters, and the
// search's probe and queries per task.
struct ClusterPlan {
  kernels::KernelParams params;  // the plan's, checking logits only where they can overflow
  bool shared = false;
  std::vector<std::vector<index_t>> shared_keys;
  std::vector<detail::KeyClusters> kc;
  index_t probe = 0, rows = 0, tasks = 0;  // rows: queries per task; tasks per pair
  double flops = 0.0;                      // of the search
};

ClusterPlan plan_clusters(const Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K) {
  const AttentionOptions& o = pl.o;
  ClusterPlan cp;
  // Logits scale q.k and centroid scores q.c (|c| <= max |k|): one bound for both.
  const double max_q = detail::finite_max_abs(flat(Q), "queries"), max_k = detail::finite_max_abs(flat(K), "keys");
  cp.params = pl.params;
  cp.params.check_overflow = logits_can_overflow(std::max(1.0, std::fabs(static_cast<double>(pl.params.scale))), pl.d, max_q, max_k);
  cp.shared = o.eps > 0.0 || o.sinks > 0;
  const index_t c = o.clusters > 0 ? std::min(o.clusters, pl.n)
                                   : static_cast<index_t>(std::ceil(std::sqrt(static_cast<double>(pl.n))));
  cp.probe = std::min(c, o.probe > 0 ? o.probe : default_probe(c, pl.n, pl.k_top));
  cp.shared_keys.resize(static_cast<std::size_t>(cp.shared ? pl.heads : 0));
  cp.kc.resize(static_cast<std::size_t>(pl.heads));
  const auto one = [&](index_t h) {
    const ConstMatrix Kh = pl.kv_slice(K, h);
    if (cp.shared) cp.shared_keys[h] = shared_keys(o, Kh, static_cast<std::uint64_t>(h), pl.open_keys(h));
    const auto stream = static_cast<std::uint64_t>(h);
    cp.kc[h] = detail::cluster_keys(Kh, c, o.cluster_iterations,
                                    detail::CounterRng(o.seed, detail::Purpose::cluster_seeds, stream),
                                    detail::CounterRng(o.seed, detail::Purpose::cluster_sample, stream));
  };
  // Many pairs: one thread each; few: one after another, each k-means step using the team.
  const double nd = static_cast<double>(pl.heads * pl.n * pl.d);
  if (pl.heads >= omp_get_max_threads())
    detail::parallel_tasks(pl.heads, 2.0 * nd * static_cast<double>(c * o.cluster_iterations), [] { return 0; },
                           [&](index_t h, int&) { one(h); });
  else
    for (index_t h = 0; h < pl.heads; ++h) one(h);
  // About one candidate buffer's worth of queries per task, so that each cluster's product has
  // many queries; a function of the sizes alone, so results do not depend on the thread count.
  const double per_query = static_cast<double>(cp.probe) * std::ceil(static_cast<double>(pl.n) / static_cast<double>(c));
  const double fit = std::floor(static_cast<double>(detail::kRunRanks) / per_query / kernels::kQueryBlock) * kernels::kQueryBlock;
  cp.rows = std::min(pl.m, static_cast<index_t>(std::clamp<double>(fit, kernels::kQueryBlock, 16 * kernels::kQueryBlock)));
  cp.tasks = (pl.m + cp.rows - 1) / cp.rows;
  cp.flops = 2.0 * static_cast<double>(pl.heads * pl.m * pl.d) * (static_cast<double>(c) + per_query);
  return cp;
}

// Per-thread buffers of the clustered search and attention.
struct ClusterTask {
  detail::ClusterWork search;
  detail::ClusterAttendWork attend;
  std::vector<char> excluded;
};

// Calls visit(h, candidates, task) for every run of queries of every pair, in parallel by
// (pair, query range); each query's own keys leave out its pair's shared keys and its window.
template <class Visit>
void search_all(const Plan& pl, const ClusterPlan& cp, const Tensor4Ref& Q, double flops, Visit&& visit) {
  detail::parallel_tasks(pl.heads * cp.tasks, flops, [] { return ClusterTask(); }, [&](index_t t, ClusterTask& w) {
    const index_t h = t / cp.tasks, i0 = (t % cp.tasks) * cp.rows, i1 = std::min(pl.m, i0 + cp.rows);
    // Left out of the search: the shared keys and the masked ones.
    const std::uint8_t* open = pl.open_keys(h);
    if (cp.shared || open) {
      w.excluded.assign(static_cast<std::size_t>(pl.n), 0);
      if (cp.shared)
        for (index_t j : cp.shared_keys[h]) w.excluded[j] = 1;
      if (open)
        for (index_t j = 0; j < pl.n; ++j) w.excluded[j] |= open[j] ? 0 : 1;
    }
    detail::search_clusters(cp.params, pl.q_slice(Q, h), cp.kc[h], cp.probe, pl.k_top, i0, i1,
                            {cp.shared || open ? w.excluded.data() : nullptr, pl.window, pl.o.causal}, w.search,
                            [&](const detail::ClusterCandidates& cand) { visit(h, cand, w); });
  });
}

// Select::cluster: per pair its shared keys and clusters, then each query's top_k keys among its
// probed clusters' keys outside the shared set and window.
void select_clustered(const Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K, Selection& sel) {
  ClusterPlan cp = plan_clusters(pl, Q, K);
  sel.query_keys.resize(static_cast<std::size_t>(checked_elements({pl.heads, pl.m, pl.k_top}, "cluster keys")));
  search_all(pl, cp, Q, cp.flops, [&](index_t h, const detail::ClusterCandidates& cand, ClusterTask&) {
    detail::kept_keys(cand, cp.kc[h], pl.k_top, sel.query_keys.data() + (h * pl.m + cand.i0) * pl.k_top);
  });
  if (cp.shared) sel.shared_keys = std::move(cp.shared_keys);
}

}  // namespace

void detail::check_attention_options(const AttentionOptions& o) { check_options(o); }

namespace {

// Row statistics and outputs of two disjoint parts of each query's keys, merged: with
// L = log(e^a + e^b), out = e^(a - L) out_a + e^(b - L) out_b (a row statistic +inf: no keys).
void merge_parts(index_t rows, index_t dv, float* out, float* stat, const float* out_b, const float* stat_b) {
  constexpr float none = std::numeric_limits<float>::infinity();
  for (index_t r = 0; r < rows; ++r) {
    const double a = stat[r], b = stat_b[r];
    float* o = out + r * dv;
    const float* ob = out_b + r * dv;
    if (b == none) continue;
    if (a == none) {
      std::copy_n(ob, dv, o);
      stat[r] = stat_b[r];
      continue;
    }
    const double top = std::max(a, b), l = top + std::log(std::exp(a - top) + std::exp(b - top));
    const double wa = std::exp(a - l), wb = std::exp(b - l);
    for (index_t x = 0; x < dv; ++x) o[x] = static_cast<float>(wa * o[x] + wb * ob[x]);
    stat[r] = static_cast<float>(l);
  }
}

// Select::cluster: the clustered search fused with attention over what it keeps (each
// cluster's keys and values met by all its queries at once), plus the shared keys and window
// attended apart (selected_attention_forward) and merged by their row statistics.
AttentionResult attend_clustered(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V, float* out,
                                 const AttentionOptions& options) {
  const Plan pl = make_plan(Q, K, V, options);
  const auto t0 = Clock::now();
  ClusterPlan cp = plan_clusters(pl, Q, K);
  detail::require_finite_matrix(flat(V), "values");
  std::vector<std::vector<float>> values(static_cast<std::size_t>(pl.heads));
  for (index_t h = 0; h < pl.heads; ++h) values[h] = detail::in_cluster_order(pl.kv_slice(V, h), cp.kc[h]);
  AttentionResult res;
  res.seconds_selection = seconds_since(t0);
  res.top_k = pl.k_top;
  std::vector<float> stat(static_cast<std::size_t>(pl.heads * pl.m));
  if (options.return_selection) {
    res.selection = layout_of(pl, Q.batch);
    res.selection.query_keys.resize(static_cast<std::size_t>(pl.heads * pl.m * pl.k_top));
  }
  std::vector<double> own(static_cast<std::size_t>(pl.heads * cp.tasks), 0.0);
  std::vector<index_t> short_rows(own.size(), 0);  // per task: queries with fewer than k_top own keys
  search_all(pl, cp, Q, 2.0 * cp.flops, [&](index_t h, const detail::ClusterCandidates& cand, ClusterTask& w) {
    const index_t row = h * pl.m + cand.i0;
    for (index_t r = 0; r < cand.rows; ++r)
      short_rows[h * cp.tasks + cand.i0 / cp.rows] +=
          cand.kept_start[(r + 1) * cand.probe] - cand.kept_start[r * cand.probe] < static_cast<std::size_t>(pl.k_top);
    own[h * cp.tasks + cand.i0 / cp.rows] +=
        detail::attend_candidates(cp.params, cand, cp.kc[h], values[h].data(), pl.dv, w.attend, out + row * pl.dv,
                                  stat.data() + row);
    if (options.return_selection) detail::kept_keys(cand, cp.kc[h], pl.k_top, res.selection.query_keys.data() + row * pl.k_top);
  });
  double keys = std::accumulate(own.begin(), own.end(), 0.0);
  if (cp.shared || pl.window >= 0) {
    Selection part;
    part.batch = Q.batch, part.heads = Q.heads, part.m = pl.m, part.n = pl.n, part.window = pl.window;
    part.causal = pl.o.causal;
    part.shared_keys = cp.shared_keys;
    const AttentionShape sh{Q.batch, Q.heads, pl.m, pl.n, pl.d, pl.dv, K.heads};
    std::vector<float> out_b(static_cast<std::size_t>(pl.heads * pl.m * pl.dv)), stat_b(stat.size());
    selected_attention_forward<float>(sh, part, options, Q.data, K.data, V.data, out_b.data(), stat_b.data());
    merge_parts(pl.heads * pl.m, pl.dv, out, stat.data(), out_b.data(), stat_b.data());
    for (index_t c : part.keys_per_query()) keys += static_cast<double>(c);
  }
  if (!detail::all_finite(out, pl.heads * pl.m * pl.dv) ||
      std::any_of(stat.begin(), stat.end(), [](float x) { return std::isnan(x); }))
    detail::invalid("attention: the scaled logits or the weighted values overflow float32; rescale queries, keys or "
                    "values (or pass a smaller scale)");
  res.seconds_attention = seconds_since(t0) - res.seconds_selection;
  res.empty_rows = std::count(stat.begin(), stat.end(), std::numeric_limits<float>::infinity());
  res.mean_keys_per_query = keys / static_cast<double>(pl.heads * pl.m);
  res.short_queries = std::accumulate(short_rows.begin(), short_rows.end(), index_t{0});
  res.shared_sizes.assign(static_cast<std::size_t>(pl.heads), 0);
  for (std::size_t h = 0; h < cp.shared_keys.size(); ++h) res.shared_sizes[h] = static_cast<index_t>(cp.shared_keys[h].size());
  if (options.return_selection && !cp.shared_keys.empty()) res.selection.shared_keys = std::move(cp.shared_keys);
  return res;
}

}  // namespace

AttentionResult attention(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V,
                          float* out, const AttentionOptions& options) {
  check_shapes(Q, K, V);
  if (!out) detail::invalid("attention: null output buffer");
  if (options.key_mask)
    detail::invalid("attention: key_mask is taken by select_keys and selected_attention_forward / _backward, not "
                    "by attention()");
  if (options.select == Select::cluster) return attend_clustered(Q, K, V, out, options);
  const Plan pl = make_plan(Q, K, V, options);
  const AttentionOptions& o = pl.o;
  const index_t heads = pl.heads, blocks = pl.blocks;
  const Inputs in{Q, K, V, out};
  AttentionResult res;
  res.top_k = pl.k_top;
  std::vector<HeadSelection> sel(static_cast<std::size_t>(pl.shared ? heads : 0));
  std::vector<index_t> top(static_cast<std::size_t>(o.select == Select::topk ? heads * pl.m * pl.k_top : 0));
  std::vector<BlockStats> stats(static_cast<std::size_t>(heads * blocks));

  // Work per head: the selection (scores O(n d^2)) and the attention over it.
  const double nd = static_cast<double>(pl.n) * static_cast<double>(pl.d);
  const double select_flops = o.select == Select::leverage ? 2.0 * nd * static_cast<double>(pl.d)
                              : o.select == Select::topk   ? 2.0 * nd * static_cast<double>(pl.m)
                                                           : 0.0;
  const double keys_per_query = o.select == Select::full ? static_cast<double>(pl.n)
                                : o.select == Select::topk ? static_cast<double>(pl.k_top)
                                : static_cast<double>(pl.k_top + o.sinks + 2 * std::max<index_t>(pl.window, 0));
  const double attend_flops = 2.0 * static_cast<double>(pl.m) * keys_per_query * static_cast<double>(pl.d + pl.dv);
  const double total = static_cast<double>(heads) * (select_flops + attend_flops);
  std::atomic<index_t> done{0};
  const auto report = [&](index_t finished) {
    if (o.progress && omp_get_thread_num() == 0)
      o.progress(static_cast<double>(finished) / static_cast<double>(heads * blocks));
  };
  const auto make = [&] { return Workspace(pl); };
  double t_select = 0.0;
  const auto t0 = Clock::now();
  if (heads >= 2 * omp_get_max_threads() || (blocks == 1 && heads > 1)) {
    // Many (batch, head) pairs: one task per pair checks its inputs, makes its selection and
    // attends, each task on one thread (nested work is serial), in one parallel region.
    std::atomic<bool> finite{true};
    detail::parallel_tasks(heads, total, make, [&](index_t h, Workspace& w) {
      bool overflow = true;
      if (!check_pair(*pl.params.ops, pl.params.scale, pl.q_slice(Q, h), pl.kv_slice(K, h), pl.kv_slice(V, h),
                      overflow)) {
        finite = false;
        return;
      }
      w.blk.set_check_overflow(overflow);
      if (pl.shared) sel[h] = select_head(o, pl.kv_slice(K, h), h, nullptr);
      for (index_t b = 0; b < blocks; ++b) {
        stats[h * blocks + b] = run_block(pl, w, in, pl.shared ? &sel[h] : nullptr, top.data(), h, b);
        report(++done);
      }
    });
    if (!finite) report_non_finite(Q, K, V);
  } else {
    // Few pairs, many queries each: the inputs are checked and the selections made first (each
    // using the team itself), then one task per (pair, query block) shares the team.
    const double max_q = detail::finite_max_abs(flat(Q), "queries");
    const double max_k = detail::finite_max_abs(flat(K), "keys");
    detail::require_finite_matrix(flat(V), "values");
    const bool overflow = logits_can_overflow(pl.params.scale, pl.d, max_q, max_k);
    if (pl.shared)
      for (index_t h = 0; h < heads; ++h)
        sel[h] = select_head(o, pl.kv_slice(K, h), h, nullptr);
    t_select = seconds_since(t0);
    detail::parallel_tasks(heads * blocks, total, make, [&](index_t t, Workspace& w) {
      const index_t h = t / blocks;
      w.blk.set_check_overflow(overflow);
      stats[t] = run_block(pl, w, in, pl.shared ? &sel[h] : nullptr, top.data(), h, t % blocks);
      report(++done);
    });
  }
  const double t_all = seconds_since(t0);
  res.seconds_selection = t_select;
  res.seconds_attention = t_all - t_select;
  double keys_total = 0.0;
  index_t non_finite = 0;
  for (const BlockStats& st : stats) {
    res.empty_rows += st.empty;
    non_finite += st.non_finite;
    keys_total += st.keys;
  }
  res.mean_keys_per_query = keys_total / static_cast<double>(heads * pl.m);
  res.shared_sizes.assign(static_cast<std::size_t>(heads), o.select == Select::full ? pl.n : 0);
  for (index_t h = 0; h < static_cast<index_t>(sel.size()); ++h)
    for (const auto& set : sel[h].sets) res.shared_sizes[h] = std::max(res.shared_sizes[h], static_cast<index_t>(set.size()));

  // Finite inputs can still overflow float32: in the logits (|q||k| scale > 3e38) or, for values
  // near the float32 limit, in the weighted sum.
  if (non_finite > 0) {
    detail::invalid("attention: the scaled logits or the weighted values overflow float32 in " +
                    std::to_string(non_finite) + " output rows; rescale queries, keys or values "
                    "(or pass a smaller scale)");
  }
  if (o.return_selection) {
    res.selection = layout_of(pl, Q.batch);
    for (auto& s : sel)
      for (auto& set : s.sets) res.selection.shared_keys.push_back(std::move(set));
    res.selection.query_keys = std::move(top);
  }
  return res;
}


Selection selection_layout(const AttentionShape& sh, const AttentionOptions& options) {
  if (sh.batch < 1 || sh.heads < 1 || sh.m < 1 || sh.n < 1 || sh.d < 1 || sh.dv < 1) {
    std::ostringstream os;
    os << "attention: expected a non-empty shape, got (batch, heads, m, n, d, dv) = (" << sh.batch << ", " << sh.heads
       << ", " << sh.m << ", " << sh.n << ", " << sh.d << ", " << sh.dv << ")";
    detail::invalid(os.str());
  }
  // The plan reads only the shapes.
  if (sh.kv_heads < 0 || sh.heads % sh.kv() != 0)
    detail::invalid("attention: the key/value heads (" + std::to_string(sh.kv_heads) + ") must divide the query heads (" +
                    std::to_string(sh.heads) + ")");
  const Tensor4Ref Q{nullptr, sh.batch, sh.heads, sh.m, sh.d}, K{nullptr, sh.batch, sh.kv(), sh.n, sh.d},
      V{nullptr, sh.batch, sh.kv(), sh.n, sh.dv};
  return layout_of(make_plan(Q, K, V, options), sh.batch);
}

Selection select_keys(const Tensor4Ref& Q, const Tensor4Ref& K, const AttentionOptions& options) {
  check_shapes(Q, K, K);  // no values: K stands in for V's shape
  const Plan pl = make_plan(Q, K, K, options);
  detail::require_finite_matrix(flat(Q), "queries");
  detail::require_finite_matrix(flat(K), "keys");
  Selection sel = layout_of(pl, Q.batch);
  if (pl.o.key_mask) sel.key_mask.assign(pl.o.key_mask, pl.o.key_mask + Q.batch * pl.n);
  if (pl.shared) {
    std::vector<HeadSelection> heads(static_cast<std::size_t>(pl.heads));
    const double flops = pl.o.select == Select::leverage
                             ? 2.0 * static_cast<double>(pl.heads * pl.n * pl.d) * static_cast<double>(pl.d)
                             : 0.0;
    detail::parallel_tasks(pl.heads, flops, [] { return 0; }, [&](index_t h, int&) {
      heads[h] = select_head(pl.o, pl.kv_slice(K, h), h, pl.open_keys(h));
    });
    for (auto& head : heads)
      for (auto& set : head.sets) sel.shared_keys.push_back(std::move(set));
  } else if (pl.o.select == Select::topk) {
    sel.query_keys.resize(static_cast<std::size_t>(checked_elements({pl.heads, pl.m, pl.k_top}, "top-k keys")));
    const double flops = 2.0 * static_cast<double>(pl.heads * pl.m) * static_cast<double>(pl.n * pl.d);
    detail::parallel_tasks(pl.heads * pl.blocks, flops, [] { return std::vector<float>(); },
                           [&](index_t t, std::vector<float>& tile) {
                             const index_t h = t / pl.blocks, i0 = (t % pl.blocks) * kernels::kQueryBlock;
                             const index_t i1 = std::min(pl.m, i0 + kernels::kQueryBlock);
                             detail::top_keys(pl.params, pl.q_slice(Q, h), pl.kv_slice(K, h), pl.k_top, i0, i1,
                                              sel.query_keys.data() + (h * pl.m + i0) * pl.k_top, tile, pl.o.causal,
                                              pl.open_keys(h));
                           });
  } else if (pl.o.select == Select::cluster) {
    select_clustered(pl, Q, K, sel);
  }
  return sel;
}

std::vector<float> attention(ConstMatrix Q, ConstMatrix K, ConstMatrix V,
                             const AttentionOptions& options, AttentionResult* result) {
  if (Q.ld != Q.cols || K.ld != K.cols || V.ld != V.cols) {
    detail::invalid("attention: queries, keys and values must have contiguous rows (ld == cols)");
  }
  std::vector<float> out(static_cast<std::size_t>(std::max<index_t>(Q.rows, 0) *
                                                  std::max<index_t>(V.cols, 0)));
  const Tensor4Ref q{Q.data, 1, 1, Q.rows, Q.cols}, k{K.data, 1, 1, K.rows, K.cols},
      v{V.data, 1, 1, V.rows, V.cols};
  AttentionResult r = attention(q, k, v, out.empty() ? nullptr : out.data(), options);
  if (result) *result = std::move(r);
  return out;
}

}  // namespace levattn
