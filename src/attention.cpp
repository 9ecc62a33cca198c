// The attention driver: plans the call, makes the selection (plan.hpp, as select_keys does),
// then attends it with the one engine (engine::forward); Select::cluster fuses its search with
// attention over the keys it keeps.
#include "levattn/attention.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>

#include "detail/validate.hpp"
#include "plan.hpp"

namespace levattn {
namespace {

using Clock = std::chrono::steady_clock;
using planner::flat;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Mean |S_i| over the queries: closed form for shared sets alone, else Selection::keys_per_query.
double mean_keys_per_query(const Selection& sel) {
  const double rows = static_cast<double>(sel.pairs() * sel.m);
  if (!sel.causal && sel.window < 0 && sel.top_k == 0 && sel.residual == 0 && sel.key_mask.empty() && sel.segment == 0) {
    if (sel.all_keys) return static_cast<double>(sel.n);
    double sum = 0.0;
    for (const auto& set : sel.shared_keys) sum += static_cast<double>(set.size());
    return sum * static_cast<double>(sel.m) / rows;
  }
  const std::vector<index_t> keys = sel.keys_per_query();
  return static_cast<double>(std::accumulate(keys.begin(), keys.end(), index_t{0})) / rows;
}

// Select::cluster: the clustered search fused with attention over what it keeps (each
// cluster's keys and values met by all its queries at once), plus the shared keys and window
// attended apart (engine::forward) and merged by their row statistics (engine::merge).
AttentionResult attend_clustered(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V, float* out,
                                 const AttentionOptions& options) {
  const planner::Plan pl = planner::make_plan(Q, K, V, options);
  const auto t0 = Clock::now();
  planner::ClusterPlan cp = planner::plan_clusters(pl, Q, K);
  detail::require_finite_matrix(flat(V), "values");
  std::vector<std::vector<float>> values(static_cast<std::size_t>(pl.heads));
  for (index_t h = 0; h < pl.heads; ++h) values[h] = detail::in_cluster_order(pl.kv_slice(V, h), cp.kc[h]);
  AttentionResult res;
  res.seconds_selection = seconds_since(t0);
  res.top_k = pl.k_top;
  std::vector<float> stat(static_cast<std::size_t>(pl.heads * pl.m));
  if (options.return_selection) {
    res.selection = planner::layout_of(pl, Q.batch);
    if (options.key_mask) res.selection.key_mask.assign(options.key_mask, options.key_mask + Q.batch * pl.n);
    res.selection.query_keys.resize(static_cast<std::size_t>(pl.heads * pl.m * pl.k_top));
  }
  std::vector<double> own(static_cast<std::size_t>(pl.heads * cp.tasks), 0.0);
  std::vector<index_t> short_rows(own.size(), 0);  // per task: queries with fewer than k_top own keys
  planner::search_all(pl, cp, Q, 2.0 * cp.flops, [&](index_t h, const detail::ClusterCandidates& cand,
                                                        planner::ClusterTask& w) {
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
  planner::check_shapes(Q, K, V);
  LEVATTN_REQUIRE(out, "attention", "null output buffer");
  // Cluster's fused search attends what it keeps as it finds it; sampling the rest needs the
  // whole selection first, so with a residual part it takes the path of the other selections.
  if (options.select == Select::cluster && options.residual == 0) return attend_clustered(Q, K, V, out, options);
  const auto t0 = Clock::now();
  planner::Plan pl = planner::make_plan(Q, K, V, options);
  // Selections that read the data scan it first; full, window and random leave it to the
  // engine, which scans each pair as it attends it.
  const bool reads_data = pl.o.select == Select::leverage || pl.o.select == Select::topk;
  std::optional<engine::CheckedInputs> checked;
  if (reads_data) {
    checked = planner::scan_inputs(pl, Q, K);
    detail::require_finite_matrix(flat(V), "values");
  }
  Selection sel = planner::make_selection(pl, Q, K);
  AttentionResult res;
  res.seconds_selection = seconds_since(t0);
  const AttentionShape sh{Q.batch, Q.heads, Q.rows, K.rows, Q.cols, V.cols, K.heads};
  res.empty_rows = engine::forward(sh, sel, options, Q.data, K.data, V.data, out, nullptr, options.progress,
                                   checked ? &*checked : nullptr);
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
