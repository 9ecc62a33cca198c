// cluster.hpp: keys grouped by k-means, the per-query search over the clusters a query's
// centroid scores pick, and attention over what the search keeps (Select::cluster).
#pragma once
#include <cstddef>
#include <functional>
#include <vector>

#include "detail/rng.hpp"
#include "kernels/online_attention.hpp"

namespace levattn::detail {

/// Keys grouped into clusters by Lloyd's k-means (Euclidean: assignment by the largest
/// k.c - |c|^2 / 2, one GEMM per step), the key rows stored cluster by cluster.
struct KeyClusters {
  index_t count = 0, d = 0;
  std::vector<float> centroids;  ///< count x d, the mean of each cluster's training keys
  std::vector<index_t> order;    ///< key indices cluster by cluster, ascending within one
  std::vector<index_t> start;    ///< count + 1 offsets into order
  std::vector<float> keys;       ///< the rows of K in `order` (n x d)

  index_t size(index_t j) const { return start[j + 1] - start[j]; }
};

/// Keys k-means trains on per cluster: beyond this, more keys move the centroids little and
/// cost a full pass each step (FAISS caps its training set the same way).
inline constexpr index_t kTrainPerCluster = 32;

/// min(clusters, n) clusters of K's rows: at most `iterations` Lloyd steps over a training set
/// of min(n, kTrainPerCluster clusters) keys drawn by `sample` (all keys when n is smaller),
/// started from distinct training keys drawn by `starts` (fewer steps once no training key
/// changes cluster), then every key assigned to its nearest centroid. Deterministic: every sum
/// in key order, whatever the thread count (the assignment steps use the team when called
/// outside a parallel region). O((iterations min(n, 64 clusters) + n) clusters d) time,
/// O(n d + 4096 clusters) memory.
KeyClusters cluster_keys(ConstMatrix K, index_t clusters, index_t iterations, const CounterRng& starts,
                         const CounterRng& sample);

/// The rows of M (n x cols, one per key) in the clusters' key order: n x cols.
std::vector<float> in_cluster_order(ConstMatrix M, const KeyClusters& kc);

/// What the search leaves for a run of queries i0 .. i0 + rows - 1: each query's `probe` clusters
/// of largest centroid score (q.c; power: |q.c|; ties to the lower cluster), and among their keys
/// the query's best k by rank f(s) (softmax: s = scale q.k, power: |s|; ties to the lower key, as
/// the exact top-k), leaving out the keys it may not take.
struct ClusterCandidates {
  index_t i0 = 0, rows = 0, probe = 0;
  std::vector<index_t> picked;  ///< rows x probe: each query's clusters, ascending
  /// Per cluster, the (query, slot in its picked list) pairs that probe it, queries ascending:
  /// member_start (clusters + 1) into member_row and member_slot.
  std::vector<index_t> member_start, member_row, member_slot;
  /// The kept keys of query r in its slot s: entries kept_start[r probe + s] ..
  /// kept_start[r probe + s + 1] of kept_rank (their ranks) and kept_index (their positions in
  /// the cluster's key order).
  std::vector<std::size_t> kept_start;
  std::vector<float> kept_rank;
  std::vector<index_t> kept_index;
  std::vector<float> best;  ///< per query: its largest rank (-inf if none)
};

/// Per-thread buffers of the search, reused across calls.
struct ClusterWork {
  ClusterCandidates cand;
  std::vector<std::size_t> block, segment;  // per cluster / per (query, slot): offsets into rank
  std::vector<float> rank, route, qs, row, scratch;
};

/// Candidate ranks a run of queries holds at most (16 MB), unless one query has more.
inline constexpr std::size_t kRunRanks = std::size_t(1) << 22;

/// Keys a query's search leaves out: excluded[j] != 0 (nullable), those within `window` of the
/// query (window >= 0) and, with causal, those after it.
struct Excluded {
  const char* keys = nullptr;
  index_t window = -1;
  bool causal = false;
};

/// Searches queries i0 .. i1 - 1 of Q against kc with budget k, leaving out the keys `excluded`
/// names, and calls
/// visit(cand) for consecutive runs of queries whose candidates fit run_ranks (a run holds at
/// least one query). Results depend on the queries alone, not on the runs or the thread.
/// Throws Error(invalid_argument) on logits that overflow float (checked if params says so).
/// O((i1 - i0) (clusters + probe n / clusters) d) time, O(run_ranks + n) memory.
void search_clusters(const kernels::KernelParams& params, ConstMatrix Q, const KeyClusters& kc, index_t probe,
                     index_t k, index_t i0, index_t i1, const Excluded& excluded, ClusterWork& work,
                     const std::function<void(const ClusterCandidates&)>& visit, std::size_t run_ranks = kRunRanks);

/// The kept keys of each query of `cand` (at most k), ascending, -1 in the slots beyond them:
/// out (cand.rows x k).
void kept_keys(const ClusterCandidates& cand, const KeyClusters& kc, index_t k, index_t* out);

/// Per-thread buffers of attend_candidates, reused across calls.
struct ClusterAttendWork {
  std::vector<float> weights, acc, dense, product;
  std::vector<double> sum;
};

/// Attention of each query of `cand` over its kept keys, with g(s) = s (softmax) or p log|s|
/// (power): out_r = sum_kept exp(g(s_j) - L_r) v_j, stat_r = L_r = log sum_kept exp(g(s_j)) (+inf,
/// and out_r = 0, for a query with no weight), the terms of selected_attention_forward. Per
/// cluster, one product of its members' weights (zero where not kept) with its value rows where
/// they keep a quarter of its (query, key) pairs or more, else each member's weighted sum of its
/// kept rows. values: V in the clusters' key order (n x dv); out (cand.rows x dv), stat
/// (cand.rows). Returns the number of keys kept, summed over the queries.
/// O(rows probe (n / clusters) dv) time.
double attend_candidates(const kernels::KernelParams& params, const ClusterCandidates& cand, const KeyClusters& kc,
                       const float* values, index_t dv, ClusterAttendWork& work, float* out, float* stat);

}  // namespace levattn::detail
