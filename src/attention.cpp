// The attention driver: validates, makes the selection (select_keys), then attends it with the
// one engine (engine::forward); Select::cluster fuses its search with attention over its keys.
#include "levattn/attention.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "cluster.hpp"
#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "selectors.hpp"
#include "detail/validate.hpp"
#include "engine.hpp"
#include "kernels/online_attention.hpp"
#include "levattn/causal.hpp"
#include "levattn/lewis_weights.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

ConstMatrix flat(const Tensor4Ref& t) { return {t.data, t.batch * t.heads * t.rows, t.cols}; }

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

void check_options(const AttentionOptions& o) {
  detail::check_kernel(o);
  LEVATTN_REQUIRE(o.window >= -1, "window", "expected an integer >= 0 (or -1 for none), got ", o.window);
  LEVATTN_REQUIRE(o.sinks >= 0, "sinks", "expected an integer >= 0, got ", o.sinks);
  const bool local = o.window >= 0 || o.sinks > 0;
  const std::string select = to_string(o.select);
  LEVATTN_REQUIRE(o.eps == 0.0 || o.select == Select::leverage || o.select == Select::cluster, "eps",
                  "applies to select leverage and cluster only, got select ", select);
  // Options the chosen selection would not read are an error, not silently dropped.
  const bool cluster_set = o.clusters != 0 || o.probe != 0 || o.cluster_iterations != AttentionOptions{}.cluster_iterations;
  LEVATTN_REQUIRE(o.select == Select::cluster || !cluster_set, "clusters, probe, iterations",
                  "apply to select cluster only, got select ", select);
  LEVATTN_REQUIRE(o.top_k == 0 || (o.select != Select::full && o.select != Select::window), "top_k", "select ", select,
                  " takes no key budget");
  switch (o.select) {
    case Select::full:
    case Select::topk:
      LEVATTN_REQUIRE(!local, "select " + select, "window and sinks combine only with leverage, random, window or cluster");
      LEVATTN_REQUIRE(o.select != Select::topk || o.top_k >= 1, "top_k", "select topk needs a budget >= 1, got ",
                      o.top_k);
      break;
    case Select::leverage:
      LEVATTN_REQUIRE((o.top_k > 0) != (o.eps > 0.0), "select leverage",
                      "give exactly one of top_k >= 1 or eps in (0, 1]");
      if (o.eps != 0.0 || o.top_k <= 0) detail::require_eps(o.eps);
      LEVATTN_REQUIRE(o.top_k >= 0, "top_k", "expected an integer >= 1");
      break;
    case Select::random:
      LEVATTN_REQUIRE(o.top_k >= 1, "top_k", "select random needs a budget >= 1, got ", o.top_k);
      break;
    case Select::window:
      LEVATTN_REQUIRE(local, "select window", "give a window >= 0 or sinks >= 1");
      break;
    case Select::cluster:
      LEVATTN_REQUIRE(o.top_k >= 1, "top_k", "select cluster needs a per-query budget >= 1, got ", o.top_k);
      if (o.eps != 0.0) detail::require_eps(o.eps);
      LEVATTN_REQUIRE(o.clusters >= 0 && o.probe >= 0 && o.cluster_iterations >= 1, "cluster",
                      "expected clusters >= 0, probe >= 0 (0: defaults) and iterations >= 1, got ", o.clusters, ", ",
                      o.probe, ", ", o.cluster_iterations);
      break;
  }
  if (o.causal && o.select == Select::leverage) {
    LEVATTN_REQUIRE(o.top_k <= 0, "causal leverage",
                    "give eps (each block's causal universal set); top_k keys by prefix score cannot be kept exactly "
                    "in one pass");
    LEVATTN_REQUIRE(o.kernel != Kernel::power || o.p == 2.0, "causal leverage",
                    "the causal sets are x^2 leverage scores; with the poly kernel p must be 2");
    LEVATTN_REQUIRE(o.leverage.method == ScoreMethod::exact, "causal leverage", "needs exact scores (method exact)");
  }
}

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

Plan make_plan(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V, const AttentionOptions& options) {
  Plan pl;
  pl.o = resolve_budget(options, K.rows);
  check_options(pl.o);
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

// Pairs one after another, each using the team (few pairs: the work inside, BLAS and
// parallel_tasks, runs threaded), or one thread each (as many pairs as threads).
template <class F>
void for_each_pair(index_t pairs, double flops, F&& f) {
  if (pairs >= omp_get_max_threads())
    detail::parallel_tasks(pairs, flops, [] { return 0; }, [&](index_t h, int&) { f(h); });
  else
    for (index_t h = 0; h < pairs; ++h) f(h);
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

// One pass over Q and K: finite (else the error names the entry), and their largest entries,
// which decide whether logit tiles need an overflow check (set in the plan's kernel).
engine::CheckedInputs scan_inputs(Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K) {
  const engine::CheckedInputs c{detail::finite_max_abs(flat(Q), "queries"), detail::finite_max_abs(flat(K), "keys")};
  pl.params.check_overflow = engine::logits_can_overflow(pl.params.scale, pl.d, c.max_q, c.max_k);
  return c;
}

// The selection of a plan on scanned inputs (scan_inputs): shared sets, per-query top-k keys or
// clusters, per (batch, head) pair.
Selection make_selection(const Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K) {
  Selection sel = layout_of(pl, Q.batch);
  if (pl.o.key_mask) sel.key_mask.assign(pl.o.key_mask, pl.o.key_mask + Q.batch * pl.n);
  if (pl.shared) {
    std::vector<std::vector<std::vector<index_t>>> heads(static_cast<std::size_t>(pl.heads));
    const double flops = pl.o.select == Select::leverage
                             ? 2.0 * static_cast<double>(pl.heads * pl.n * pl.d) * static_cast<double>(pl.d)
                             : 0.0;
    for_each_pair(pl.heads, flops, [&](index_t h) { heads[h] = shared_sets(pl.o, pl.kv_slice(K, h), h, pl.open_keys(h)); });
    for (auto& head : heads)
      for (auto& set : head) sel.shared_keys.push_back(std::move(set));
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

// Mean |S_i| over the queries: closed form for shared sets alone, else Selection::keys_per_query.
double mean_keys_per_query(const Selection& sel) {
  const double rows = static_cast<double>(sel.pairs() * sel.m);
  if (!sel.causal && sel.window < 0 && sel.top_k == 0 && sel.key_mask.empty() && sel.segment == 0) {
    if (sel.all_keys) return static_cast<double>(sel.n);
    double sum = 0.0;
    for (const auto& set : sel.shared_keys) sum += static_cast<double>(set.size());
    return sum * static_cast<double>(sel.m) / rows;
  }
  const std::vector<index_t> keys = sel.keys_per_query();
  return static_cast<double>(std::accumulate(keys.begin(), keys.end(), index_t{0})) / rows;
}

}  // namespace

void detail::check_attention_options(const AttentionOptions& o) { check_options(o); }

namespace {

// Select::cluster: the clustered search fused with attention over what it keeps (each
// cluster's keys and values met by all its queries at once), plus the shared keys and window
// attended apart (engine::forward) and merged by their row statistics (engine::merge).
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
    if (options.key_mask) res.selection.key_mask.assign(options.key_mask, options.key_mask + Q.batch * pl.n);
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
    if (options.key_mask) part.key_mask.assign(options.key_mask, options.key_mask + Q.batch * pl.n);
    const AttentionShape sh{Q.batch, Q.heads, pl.m, pl.n, pl.d, pl.dv, K.heads};
    std::vector<float> out_b(static_cast<std::size_t>(pl.heads * pl.m * pl.dv)), stat_b(stat.size());
    engine::forward(sh, part, options, Q.data, K.data, V.data, out_b.data(), stat_b.data(), nullptr);
    engine::merge(pl.heads * pl.m, pl.dv, out, stat.data(), out_b.data(), stat_b.data());
    for (index_t c : part.keys_per_query()) keys += static_cast<double>(c);
  }
  LEVATTN_REQUIRE(detail::all_finite(out, pl.heads * pl.m * pl.dv) &&
                      std::none_of(stat.begin(), stat.end(), [](float x) { return std::isnan(x); }),
                  "attention", "the scaled logits or the weighted values overflow float32; rescale queries, keys or "
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
  LEVATTN_REQUIRE(out, "attention", "null output buffer");
  if (options.select == Select::cluster) return attend_clustered(Q, K, V, out, options);
  const auto t0 = Clock::now();
  Plan pl = make_plan(Q, K, V, options);
  const engine::CheckedInputs checked = scan_inputs(pl, Q, K);
  detail::require_finite_matrix(flat(V), "values");
  Selection sel = make_selection(pl, Q, K);
  AttentionResult res;
  res.seconds_selection = seconds_since(t0);
  const AttentionShape sh{Q.batch, Q.heads, Q.rows, K.rows, Q.cols, V.cols, K.heads};
  res.empty_rows = engine::forward(sh, sel, options, Q.data, K.data, V.data, out, nullptr, options.progress, &checked);
  res.seconds_attention = seconds_since(t0) - res.seconds_selection;
  res.top_k = pl.k_top;
  res.mean_keys_per_query = mean_keys_per_query(sel);
  res.shared_sizes.assign(static_cast<std::size_t>(sel.pairs()), sel.all_keys ? sh.n : 0);
  for (std::size_t set = 0; set < sel.shared_keys.size(); ++set) {
    index_t& size = res.shared_sizes[set / static_cast<std::size_t>(sel.segments())];
    size = std::max(size, static_cast<index_t>(sel.shared_keys[set].size()));
  }
  if (options.return_selection) res.selection = std::move(sel);
  return res;
}

Selection selection_layout(const AttentionShape& sh, const AttentionOptions& options) {
  LEVATTN_REQUIRE(sh.batch >= 1 && sh.heads >= 1 && sh.m >= 1 && sh.n >= 1 && sh.d >= 1 && sh.dv >= 1, "attention",
                  "expected a non-empty shape, got (batch, heads, m, n, d, dv) = (", sh.batch, ", ", sh.heads, ", ",
                  sh.m, ", ", sh.n, ", ", sh.d, ", ", sh.dv, ")");
  // The plan reads only the shapes.
  LEVATTN_REQUIRE(sh.kv_heads >= 0 && sh.heads % sh.kv() == 0, "attention", "the key/value heads (", sh.kv_heads,
                  ") must divide the query heads (", sh.heads, ")");
  const Tensor4Ref Q{nullptr, sh.batch, sh.heads, sh.m, sh.d}, K{nullptr, sh.batch, sh.kv(), sh.n, sh.d},
      V{nullptr, sh.batch, sh.kv(), sh.n, sh.dv};
  return layout_of(make_plan(Q, K, V, options), sh.batch);
}

Selection select_keys(const Tensor4Ref& Q, const Tensor4Ref& K, const AttentionOptions& options) {
  check_shapes(Q, K, K);  // no values: K stands in for V's shape
  Plan pl = make_plan(Q, K, K, options);
  scan_inputs(pl, Q, K);
  return make_selection(pl, Q, K);
}

std::vector<float> attention(ConstMatrix Q, ConstMatrix K, ConstMatrix V,
                             const AttentionOptions& options, AttentionResult* result) {
  LEVATTN_REQUIRE(Q.ld == Q.cols && K.ld == K.cols && V.ld == V.cols, "attention",
                  "queries, keys and values must have contiguous rows (ld == cols)");
  std::vector<float> out(static_cast<std::size_t>(std::max<index_t>(Q.rows, 0) *
                                                  std::max<index_t>(V.cols, 0)));
  const Tensor4Ref q{Q.data, 1, 1, Q.rows, Q.cols}, k{K.data, 1, 1, K.rows, K.cols},
      v{V.data, 1, 1, V.rows, V.cols};
  AttentionResult r = attention(q, k, v, out.empty() ? nullptr : out.data(), options);
  if (result) *result = std::move(r);
  return out;
}

}  // namespace levattn
