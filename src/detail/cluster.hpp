// detail/cluster.hpp: keys grouped by k-means, and the per-query top-k search over the clusters a
// query's centroid scores pick (Select::cluster).
#pragma once
#include <vector>

#include "detail/rng.hpp"
#include "kernels/online_attention.hpp"

namespace levattn::detail {

/// Keys grouped into clusters by Lloyd's k-means (Euclidean: assignment by the largest
/// k.c - |c|^2 / 2, one GEMM per step), the key rows stored cluster by cluster.
struct KeyClusters {
  index_t count = 0, d = 0;
  std::vector<float> centroids;  ///< count x d, the mean of each cluster's keys
  std::vector<index_t> order;    ///< key indices cluster by cluster, ascending within one
  std::vector<index_t> start;    ///< count + 1 offsets into order
  std::vector<float> keys;       ///< the rows of K in `order` (n x d)
};

/// min(clusters, n) clusters of K's rows after at most `iterations` Lloyd steps from distinct
/// keys drawn by rng (fewer steps once no key changes cluster). Deterministic: every sum in key
/// order. O(iterations n clusters d) time, O(n d + 4096 clusters) memory.
KeyClusters cluster_keys(ConstMatrix K, index_t clusters, index_t iterations, const CounterRng& rng);

/// For queries i0 .. i1 - 1 of Q: the k keys of largest f(s) (softmax: s, power: |s|) among the
/// keys of the `probe` clusters of largest centroid score (q.c; power: |q.c|), leaving out keys
/// with excluded[j] != 0 (nullable) and keys within `window` of the query (window >= 0); best first,
/// ties to the lower key, -1 in the slots beyond the candidates. out: (i1 - i0) x k.
/// O((i1 - i0) (clusters + probe n / clusters) d) time.
void clustered_top_keys(const kernels::KernelParams& params, ConstMatrix Q, const KeyClusters& kc,
                        index_t probe, index_t k, index_t i0, index_t i1, const char* excluded,
                        index_t window, index_t* out);

}  // namespace levattn::detail
