#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <unordered_set>
#include <utility>

#include "levattn/selection.hpp"

#include "detail/blas.hpp"
#include "detail/rng.hpp"
#include "detail/validate.hpp"
#include "levattn/causal.hpp"
#include "levattn/lewis_weights.hpp"
#include "levattn/universal_set.hpp"
#include "plan.hpp"
#include "selectors.hpp"

namespace levattn {

const std::vector<index_t>& Selection::shared_of(index_t h, index_t i) const {
  static const std::vector<index_t> none;
  if (shared_keys.empty()) return none;
  return shared_keys[static_cast<std::size_t>(h * segments() + (segment > 0 ? i / segment : 0))];
}

void Selection::mask_row(index_t h, index_t i, char* mask) const {
  std::fill_n(mask, n, all_keys ? 1 : 0);
  for (index_t j : shared_of(h, i)) mask[j] = 1;
  if (window >= 0)
    for (index_t j = std::max<index_t>(0, i - window); j <= std::min(n - 1, i + window); ++j) mask[j] = 1;
  for (index_t a = 0; a < top_k; ++a) {
    const index_t j = query_keys[static_cast<std::size_t>((h * m + i) * top_k + a)];
    if (j >= 0) mask[j] = 1;
  }
  // The block's sampled keys: those the other parts attend are set already, the later ones are
  // cut below.
  for (index_t a = 0; a < residual; ++a) {
    const index_t j = residual_keys[static_cast<std::size_t>((h * residual_blocks() + residual_block(i)) * residual + a)];
    if (j >= 0) mask[j] = 1;
  }
  if (causal) std::fill(mask + std::min(n, i + 1), mask + n, 0);
  if (!key_mask.empty())
    for (index_t j = 0; j < n; ++j) mask[j] = mask[j] && key_open(h, j);
}

namespace {

// The first segment whose queries can attend key j (0 unless causal with segments).
index_t first_segment(const Selection& s, index_t j) { return s.causal && s.segment > 0 ? j / s.segment : 0; }

// How many of its block's sampled keys query i of pair h attends through them: those (ascending,
// then -1) up to i if causal, outside its window band and its own keys (own: top_k slots).
index_t sampled_keys_of(const Selection& s, index_t h, index_t i, const index_t* own) {
  const index_t* keys = s.residual_keys.data() + (h * s.residual_blocks() + s.residual_block(i)) * s.residual;
  const index_t* end = std::lower_bound(keys, keys + s.residual, 0, [](index_t j, index_t) { return j >= 0; });
  const auto below = [&](index_t j) { return std::upper_bound(keys, end, j) - keys; };  // sampled keys <= j
  index_t c = static_cast<index_t>(s.causal ? below(i) : end - keys);
  if (s.window >= 0) {
    const index_t lo = i - s.window, hi = s.causal ? i : i + s.window;
    c -= static_cast<index_t>(below(hi) - below(lo - 1));
  }
  for (index_t a = 0; a < s.top_k; ++a)
    if (own[a] >= 0 && std::binary_search(keys, end, own[a])) --c;
  return c;
}

}  // namespace

std::vector<index_t> key_segments(const Selection& s) {
  const index_t pairs = s.pairs(), segs = s.segments();
  std::vector<index_t> last(static_cast<std::size_t>(checked_elements({pairs, s.n}, "key segments")), -1);
  if (s.shared_keys.empty()) return last;
  std::vector<index_t> count(static_cast<std::size_t>(s.n));
  for (index_t h = 0; h < pairs; ++h) {
    index_t* lh = last.data() + h * s.n;
    std::fill(count.begin(), count.end(), 0);
    for (index_t g = 0; g < segs; ++g)
      for (index_t j : s.shared_keys[static_cast<std::size_t>(h * segs + g)]) {
        if (g < first_segment(s, j)) continue;  // a later key: causally invisible to this segment
        lh[j] = std::max(lh[j], g);
        ++count[j];
      }
    for (index_t j = 0; j < s.n; ++j)
      if (lh[j] >= 0 && count[j] != lh[j] - first_segment(s, j) + 1)
        detail::fail(ErrorKind::internal, "key_segments", "the shared sets of pair ", h, " do not hold key ", j,
                     " over one run of segments");
  }
  return last;
}

Selection selection_from_arrays(const Selection& layout, const index_t* key_segments, const index_t* query_keys,
                                const index_t* residual_keys, const double* residual_weight) {
  Selection s = layout;
  const index_t pairs = s.pairs(), segs = s.segments();
  s.shared_keys.assign(static_cast<std::size_t>(checked_elements({pairs, segs}, "shared sets")), {});
  bool any = false;
  for (index_t h = 0; h < pairs; ++h)
    for (index_t j = 0; j < s.n; ++j) {
      const index_t g1 = key_segments[h * s.n + j];
      if (g1 < 0) {
        LEVATTN_REQUIRE(g1 == -1, "key_segments", "expected -1 or a segment index, got ", g1);
        continue;
      }
      LEVATTN_REQUIRE(g1 < segs && g1 >= first_segment(s, j), "key_segments", "key ", j, " of pair ", h,
                      " names segment ", g1, "; expected ", first_segment(s, j), " .. ", segs - 1, " or -1");
      for (index_t g = first_segment(s, j); g <= g1; ++g) s.shared_keys[static_cast<std::size_t>(h * segs + g)].push_back(j);
      any = true;
    }
  if (!any) s.shared_keys.clear();  // as select_keys leaves a selection without shared keys
  if (s.top_k > 0) s.query_keys.assign(query_keys, query_keys + pairs * s.m * s.top_k);
  if (s.residual > 0) {
    LEVATTN_REQUIRE(residual_keys && residual_weight, "residual", "the layout samples ", s.residual,
                    " keys per query; expected residual_keys and residual_weight");
    s.residual_keys.assign(residual_keys, residual_keys + pairs * s.residual_blocks() * s.residual);
    s.residual_weight.assign(residual_weight, residual_weight + pairs * s.residual_blocks());
  }
  return s;
}

std::vector<index_t> Selection::keys_per_query() const {
  std::vector<index_t> out(static_cast<std::size_t>(pairs() * m));
  std::vector<index_t> open(static_cast<std::size_t>(n + 1));  // open[j]: unmasked keys before j
  for (index_t h = 0; h < pairs(); ++h) {
    for (index_t j = 0; j < n; ++j) open[j + 1] = open[j] + (key_open(h, j) ? 1 : 0);
    for (index_t i = 0; i < m; ++i) {
      const std::vector<index_t>& s = shared_of(h, i);  // holds no masked key
      const auto below = [&](index_t j) { return static_cast<index_t>(std::upper_bound(s.begin(), s.end(), j) - s.begin()); };
      index_t c = all_keys ? open[causal ? std::min(n, i + 1) : n] : causal ? below(i) : static_cast<index_t>(s.size());
      if (window >= 0) {
        const index_t lo = std::max<index_t>(0, i - window), hi = std::min(n - 1, causal ? i : i + window);
        if (hi >= lo) c += open[hi + 1] - open[lo] - (below(hi) - below(lo - 1));  // lo > hi: a query past every key
      }
      const index_t* own = query_keys.data() + (h * m + i) * top_k;
      for (index_t a = 0; a < top_k; ++a) c += own[a] >= 0 ? 1 : 0;
      if (residual > 0) c += sampled_keys_of(*this, h, i, own);
      out[static_cast<std::size_t>(h * m + i)] = c;
    }
  }
  return out;
}

}  // namespace levattn

namespace levattn::detail {

void mark_members(const std::vector<index_t>& sorted, index_t j0, index_t c, char* flags) {
  std::fill_n(flags, c, 0);
  for (auto it = std::lower_bound(sorted.begin(), sorted.end(), j0); it != sorted.end() && *it < j0 + c; ++it)
    flags[*it - j0] = 1;
}

std::vector<index_t> random_keys(index_t n, index_t k, const CounterRng& rng) {
  std::vector<index_t> out;
  if (k >= n) {
    out.resize(static_cast<std::size_t>(n));
    for (index_t j = 0; j < n; ++j) out[j] = j;
    return out;
  }
  std::unordered_set<index_t> chosen;
  chosen.reserve(static_cast<std::size_t>(2 * k));
  std::uint64_t draw = 0;
  for (index_t j = n - k; j < n; ++j) {
    const auto t = static_cast<index_t>(rng.below(draw++, static_cast<std::uint64_t>(j + 1)));
    chosen.insert(chosen.count(t) ? j : t);
  }
  out.assign(chosen.begin(), chosen.end());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<index_t> open_keys(index_t n, const std::uint8_t* open) {
  std::vector<index_t> keys;
  keys.reserve(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j)
    if (!open || open[j]) keys.push_back(j);
  return keys;
}

void StrongestKeys::cut() {
  const Kth kth = kth_largest(*ops_, values_, size_, k_, ops_->row_max(values_, size_), *scratch_);
  const float t = kth.value;
  index_t kept = 0;
  if (kth.above + kth.equal <= static_cast<std::size_t>(k_)) {  // every tie kept
    for (index_t a = 0; a < size_; ++a) {
      values_[kept] = values_[a], keys_[kept] = keys_[a];
      kept += values_[a] >= t;
    }
  } else {  // the first ties only: the buffer is in key order, so they are the lower keys
    auto ties = static_cast<index_t>(static_cast<std::size_t>(k_) - kth.above);
    for (index_t a = 0; a < size_; ++a) {
      const float v = values_[a];
      const bool keep = v > t || (v == t && ties-- > 0);
      values_[kept] = v, keys_[kept] = keys_[a];
      kept += keep;
    }
  }
  size_ = kept;
  threshold_ = t;
}

void StrongestKeys::write(index_t* out) {
  if (size_ > k_) cut();
  std::copy_n(keys_, size_, out);  // in key order: the buffer's
  std::fill(out + size_, out + k_, index_t{-1});
  size_ = 0;
  threshold_ = -std::numeric_limits<float>::infinity();
}

namespace {

// Rows per logit product: a 64 x kKeyTile tile (128 KiB) stays in L2 between the product that
// writes it and the filter that reads it, while each key tile is read once for all the rows.
constexpr index_t kTopKRows = 64;

}  // namespace

void top_keys(const kernels::KernelParams& params, ConstMatrix Q, ConstMatrix K, index_t k,
              index_t i0, index_t i1, index_t* out, TopKeysWork& work, bool causal, const std::uint8_t* open) {
  const index_t rows = i1 - i0, n = causal ? std::min(K.rows, i1) : K.rows, d = K.cols;
  const index_t width = std::min(kernels::kKeyTile, n);
  const bool absolute = params.kernel != Kernel::softmax;
  work.tile.resize(static_cast<std::size_t>(std::min(rows, kTopKRows) * width));
  work.above.resize(static_cast<std::size_t>(width));
  const index_t room = StrongestKeys::room(k, n);  // a row adds each key once at most
  work.values.resize(static_cast<std::size_t>(rows * room));
  work.keys.resize(work.values.size());
  std::vector<StrongestKeys> best;
  best.reserve(static_cast<std::size_t>(rows));
  for (index_t r = 0; r < rows; ++r)
    best.emplace_back(k, work.values.data() + r * room, work.keys.data() + r * room, *params.ops, work.scratch);
  for (index_t c0 = 0; c0 < n; c0 += width) {
    const index_t c = std::min(width, n - c0);
    for (index_t r0 = 0; r0 < rows; r0 += kTopKRows) {
      const index_t chunk = std::min(kTopKRows, rows - r0);
      if (causal && i0 + r0 + chunk <= c0) continue;  // no row of the chunk reaches this tile
      gemm_abt(chunk, c, d, params.scale, Q.row(i0 + r0), Q.ld, K.row(c0), K.ld, 0.0f, work.tile.data(), c);
      if (params.check_overflow && params.ops->max_abs(work.tile.data(), chunk * c) < 0)
        fail(ErrorKind::invalid_argument, "topk",
             "the scaled logits overflow float32; rescale queries or keys (or pass a smaller scale)");
      for (index_t r = r0; r < r0 + chunk; ++r) {
        const index_t seen = causal ? std::min(c, i0 + r + 1 - c0) : c;  // causal: keys j <= i only
        if (seen <= 0) continue;
        float* s = work.tile.data() + (r - r0) * c;
        const float top = absolute ? params.ops->abs_row_max(s, seen) : 0.0f;  // power: ranks |logit|
        // The k-th largest of the row's first tile bounds its k-th largest over all keys from
        // below: the row starts there, and adds about k entries of this tile, not all of them.
        if (c0 == 0 && !open && seen > k && k > 0)
          best[r].raise(kth_largest(*params.ops, s, seen, k, absolute ? top : params.ops->row_max(s, seen),
                                    work.scratch).value);
        const index_t count = params.ops->indices_above(s, seen, best[r].threshold(), work.above.data());
        for (index_t a = 0; a < count; ++a) {
          const index_t j = work.above[a];
          // An entry filtered by the threshold a cut has since raised is cut again later.
          if (!open || open[c0 + j]) best[r].add(s[j], c0 + j);
        }
      }
    }
  }
  for (index_t r = 0; r < rows; ++r) best[r].write(out + r * k);
}

}  // namespace levattn::detail

namespace levattn::planner {

void check_shapes(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V) {
  const std::pair<const Tensor4Ref*, const char*> args[] = {{&Q, "queries"}, {&K, "keys"}, {&V, "values"}};
  for (const auto& [t, name] : args)
    LEVATTN_REQUIRE(t->rows >= 1 && t->cols >= 1, name, "expected a non-empty array, got ", t->rows, " rows of ",
                    t->cols, " columns");
  LEVATTN_REQUIRE(Q.data && K.data && V.data, "attention", "null data pointer for queries, keys or values");
  LEVATTN_REQUIRE(Q.batch >= 1 && Q.heads >= 1, "queries", "expected batch >= 1 and heads >= 1, got (", Q.batch, ", ",
                  Q.heads, ")");
  // Grouped-query attention: fewer key/value heads than query heads, dividing them.
  LEVATTN_REQUIRE(K.batch == Q.batch && V.batch == Q.batch && V.heads == K.heads && K.heads >= 1 && Q.heads % K.heads == 0,
                  "keys/values", "expected the queries' batch ", Q.batch, " and a number of heads dividing the queries' ",
                  Q.heads, " (the same for both), got keys (", K.batch, ", ", K.heads, "), values (", V.batch, ", ",
                  V.heads, ")");
  LEVATTN_REQUIRE(K.cols == Q.cols, "keys", "expected ", Q.cols, " columns (the queries' dimension d), got ", K.cols);
  LEVATTN_REQUIRE(V.rows == K.rows, "values", "expected ", K.rows, " rows (one per key), got ", V.rows);
}

namespace {

// Replaces an adaptive budget by the top_k it gives for n keys.
AttentionOptions resolve_budget(const AttentionOptions& options, index_t n) {
  AttentionOptions o = options;
  if (o.budget_alpha == 0.0 && o.budget_exponent == 0.0) return o;
  LEVATTN_REQUIRE(o.top_k == 0, "budget", "give either top_k or an adaptive budget, not both");
  LEVATTN_REQUIRE(o.select == Select::topk || o.select == Select::leverage || o.select == Select::random ||
                      o.select == Select::cluster,
                  "budget", "applies to select topk, leverage, random and cluster only");
  o.top_k = adaptive_budget(n, o.budget_alpha, o.budget_exponent);
  o.budget_alpha = o.budget_exponent = 0.0;
  return o;
}

// Pairs one after another, each using the team (few pairs: the work inside, BLAS and
// parallel_tasks, runs threaded), or one thread each (as many pairs as threads).
template <class F>
void for_each_pair(index_t pairs, double flops, F&& f) {
  if (pairs >= omp_get_max_threads())
    detail::parallel_tasks(pairs, flops, [] { return 0; }, [&](index_t h, int&) { f(h); });
  else
    for (index_t h = 0; h < pairs; ++h) f(h);
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

// The shared sets of head h: its shared_keys, or with causal leverage one per block of
// kCausalBlock queries (the block's causal set plus the sinks).
std::vector<std::vector<index_t>> shared_sets(const AttentionOptions& o, ConstMatrix Kh, index_t h,
                                              const std::uint8_t* open) {
  if (!(o.causal && o.select == Select::leverage)) return {shared_keys(o, Kh, static_cast<std::uint64_t>(h), open)};
  const DenseMatrix<float> zeroed = open ? without_masked(Kh, open) : DenseMatrix<float>();
  std::vector<std::vector<index_t>> sets =
      causal_universal_sets(open ? zeroed.view() : Kh, o.eps, kCausalBlock, o.leverage).shared_keys;
  const index_t n_open = static_cast<index_t>(detail::open_keys(Kh.rows, open).size());
  for (auto& set : sets) add_sinks(set, std::min(o.sinks, n_open), open);
  return sets;
}

}  // namespace

Plan make_plan(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V, const AttentionOptions& options) {
  Plan pl;
  pl.o = resolve_budget(options, K.rows);
  detail::check_attention_options(pl.o);
  const AttentionOptions& o = pl.o;
  pl.heads = Q.batch * Q.heads;
  pl.qheads = Q.heads;
  pl.group = K.heads > 0 ? Q.heads / K.heads : 1;
  pl.m = Q.rows, pl.n = K.rows, pl.d = Q.cols, pl.dv = V.cols;
  LEVATTN_REQUIRE(!o.causal || pl.m == pl.n, "causal", "expected as many queries as keys (query i sees keys 0 .. i), got ",
                  pl.m, " queries and ", pl.n, " keys");
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

Selection layout_of(const Plan& pl, index_t batch) {
  Selection sel;
  sel.batch = batch, sel.heads = pl.qheads, sel.m = pl.m, sel.n = pl.n;
  sel.all_keys = pl.o.select == Select::full;
  sel.causal = pl.o.causal;
  if (pl.shared || pl.o.select == Select::cluster) sel.window = pl.window;
  if (pl.o.select == Select::topk || pl.o.select == Select::cluster) sel.top_k = pl.k_top;
  if (pl.o.causal && pl.o.select == Select::leverage) sel.segment = kCausalBlock;
  sel.residual = std::min(pl.o.residual, pl.n);
  return sel;
}

ClusterPlan plan_clusters(const Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K) {
  const AttentionOptions& o = pl.o;
  ClusterPlan cp;
  // Logits scale q.k and centroid scores q.c (|c| <= max |k|): one bound for both.
  const double max_q = detail::finite_max_abs(flat(Q), "queries"), max_k = detail::finite_max_abs(flat(K), "keys");
  cp.params = pl.params;
  cp.params.check_overflow = engine::logits_can_overflow(std::max(1.0, std::fabs(static_cast<double>(pl.params.scale))), pl.d, max_q, max_k);
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
  const double nd = static_cast<double>(pl.heads * pl.n * pl.d);
  for_each_pair(pl.heads, 2.0 * nd * static_cast<double>(c * o.cluster_iterations), one);
  // About one candidate buffer's worth of queries per task, so that each cluster's product has
  // many queries; a function of the sizes alone, so results do not depend on the thread count.
  const double per_query = static_cast<double>(cp.probe) * std::ceil(static_cast<double>(pl.n) / static_cast<double>(c));
  const double fit = std::floor(static_cast<double>(detail::kRunRanks) / per_query / kernels::kQueryBlock) * kernels::kQueryBlock;
  cp.rows = std::min(pl.m, static_cast<index_t>(std::clamp<double>(fit, kernels::kQueryBlock, 16 * kernels::kQueryBlock)));
  cp.tasks = (pl.m + cp.rows - 1) / cp.rows;
  cp.flops = 2.0 * static_cast<double>(pl.heads * pl.m * pl.d) * (static_cast<double>(c) + per_query);
  return cp;
}

namespace {

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

engine::CheckedInputs scan_inputs(Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K) {
  const engine::CheckedInputs c{detail::finite_max_abs(flat(Q), "queries"), detail::finite_max_abs(flat(K), "keys")};
  pl.params.check_overflow = engine::logits_can_overflow(pl.params.scale, pl.d, c.max_q, c.max_k);
  return c;
}

Selection make_selection(const Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K) {
  Selection sel = layout_of(pl, Q.batch);
  if (pl.o.key_mask) sel.key_mask.assign(pl.o.key_mask, pl.o.key_mask + Q.batch * pl.n);
  if (pl.shared) {
    std::vector<std::vector<std::vector<index_t>>> heads(static_cast<std::size_t>(pl.heads));
    // The work of the selections, in flops or their equivalent: leverage scores O(n d^2) per pair;
    // random draws about 1000 flops' time per key (Philox and Floyd's insertion), which for many
    // pairs is worth the team.
    const double flops = pl.o.select == Select::leverage
                             ? 2.0 * static_cast<double>(pl.heads * pl.n * pl.d) * static_cast<double>(pl.d)
                         : pl.o.select == Select::random ? 1000.0 * static_cast<double>(pl.heads * pl.k_top)
                                                         : 0.0;
    for_each_pair(pl.heads, flops, [&](index_t h) { heads[h] = shared_sets(pl.o, pl.kv_slice(K, h), h, pl.open_keys(h)); });
    for (auto& head : heads)
      for (auto& set : head) sel.shared_keys.push_back(std::move(set));
  } else if (pl.o.select == Select::topk) {
    sel.query_keys.resize(static_cast<std::size_t>(checked_elements({pl.heads, pl.m, pl.k_top}, "top-k keys")));
    const double flops = 2.0 * static_cast<double>(pl.heads * pl.m) * static_cast<double>(pl.n * pl.d);
    detail::parallel_tasks(pl.heads * pl.blocks, flops, [] { return detail::TopKeysWork(); },
                           [&](index_t t, detail::TopKeysWork& work) {
                             const index_t h = t / pl.blocks, i0 = (t % pl.blocks) * kernels::kQueryBlock;
                             const index_t i1 = std::min(pl.m, i0 + kernels::kQueryBlock);
                             detail::top_keys(pl.params, pl.q_slice(Q, h), pl.kv_slice(K, h), pl.k_top, i0, i1,
                                              sel.query_keys.data() + (h * pl.m + i0) * pl.k_top, work, pl.o.causal,
                                              pl.open_keys(h));
                           });
  } else if (pl.o.select == Select::cluster) {
    select_clustered(pl, Q, K, sel);
  }
  if (sel.residual > 0) {
    sel.residual = 0;  // the layout's slots, which sample_residual fills
    sample_residual(sel, pl.o.residual, pl.o.seed);
  }
  return sel;
}

}  // namespace levattn::planner

namespace levattn {

Selection selection_layout(const AttentionShape& sh, const AttentionOptions& options) {
  LEVATTN_REQUIRE(sh.batch >= 1 && sh.heads >= 1 && sh.m >= 1 && sh.n >= 1 && sh.d >= 1 && sh.dv >= 1, "attention",
                  "expected a non-empty shape, got (batch, heads, m, n, d, dv) = (", sh.batch, ", ", sh.heads, ", ",
                  sh.m, ", ", sh.n, ", ", sh.d, ", ", sh.dv, ")");
  // The plan reads only the shapes.
  LEVATTN_REQUIRE(sh.kv_heads >= 0 && sh.heads % sh.kv() == 0, "attention", "the key/value heads (", sh.kv_heads,
                  ") must divide the query heads (", sh.heads, ")");
  const Tensor4Ref Q{nullptr, sh.batch, sh.heads, sh.m, sh.d}, K{nullptr, sh.batch, sh.kv(), sh.n, sh.d},
      V{nullptr, sh.batch, sh.kv(), sh.n, sh.dv};
  return planner::layout_of(planner::make_plan(Q, K, V, options), sh.batch);
}

Selection select_keys(const Tensor4Ref& Q, const Tensor4Ref& K, const AttentionOptions& options) {
  planner::check_shapes(Q, K, K);  // no values: K stands in for V's shape
  planner::Plan pl = planner::make_plan(Q, K, K, options);
  planner::scan_inputs(pl, Q, K);
  return planner::make_selection(pl, Q, K);
}

}  // namespace levattn
