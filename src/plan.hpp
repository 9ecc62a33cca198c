// plan.hpp: one attention call's plan (its options resolved and checked against the shapes) and
// the selection it makes: what select_keys and attention() share. Defined in selection.cpp.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cluster.hpp"
#include "detail/parallel.hpp"
#include "engine.hpp"
#include "kernels/online_attention.hpp"
#include "levattn/options.hpp"
#include "levattn/selection.hpp"

namespace levattn::planner {

/// All (batch, head) pairs of a stack as one matrix of their rows.
inline ConstMatrix flat(const Tensor4Ref& t) { return {t.data, t.batch * t.heads * t.rows, t.cols}; }

/// Throws Error(invalid_argument) naming queries, keys or values unless they are non-empty,
/// share batch and d, K and V share their heads (dividing Q's) and rows.
void check_shapes(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V);

/// What every (batch, head) pair of one call shares: the resolved options, sizes and kernel.
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


/// The plan of attention over Q (batch, heads, m, d), K (batch, kv, n, d), V (batch, kv, n, dv):
/// the adaptive budget resolved for n, every option checked (detail::check_attention_options)
/// and against the shapes (causal needs m == n). O(1); reads no data.
Plan make_plan(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V, const AttentionOptions& options);

/// The data-independent fields of the selection a plan makes (make_selection fills in the rest).
Selection layout_of(const Plan& pl, index_t batch);

/// One pass over Q and K: finite (else the error names the entry), and their largest entries,
/// which decide whether logit tiles need an overflow check (set in the plan's kernel).
engine::CheckedInputs scan_inputs(Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K);

/// The selection of a plan on scanned inputs (scan_inputs): shared sets, per-query top-k keys or
/// clusters, per (batch, head) pair.
Selection make_selection(const Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K);

/// Select::cluster's per-pair state: the shared keys (U_eps, sinks) and k-means clusters, and the
/// search's probe and queries per task.
struct ClusterPlan {
  kernels::KernelParams params;  // the plan's, checking logits only where they can overflow
  bool shared = false;
  std::vector<std::vector<index_t>> shared_keys;
  std::vector<detail::KeyClusters> kc;
  index_t probe = 0, rows = 0, tasks = 0;  // rows: queries per task; tasks per pair
  double flops = 0.0;                      // of the search
};

/// Select::cluster's plan: per pair its shared keys (U_eps, sinks) and k-means clusters (Q and K
/// scanned here), the probe, and the queries per search task.
ClusterPlan plan_clusters(const Plan& pl, const Tensor4Ref& Q, const Tensor4Ref& K);

/// Per-thread buffers of the clustered search and attention.
struct ClusterTask {
  detail::ClusterWork search;
  detail::ClusterAttendWork attend;
  std::vector<char> excluded;
};

/// Calls visit(h, candidates, task) for every run of queries of every pair, in parallel by
/// (pair, query range); each query's own keys leave out its pair's shared keys and its window.
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

}  // namespace levattn::planner
