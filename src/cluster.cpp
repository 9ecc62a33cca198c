// k-means over one head's keys, the clustered per-query search and attention over what it keeps
// (Select::cluster). The search scores each cluster's keys against all the queries that probe
// it in one product, and attention reuses those ranks: per cluster one product of its queries'
// weights with its value rows, so no query gathers key or value rows of its own.
#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "detail/blas.hpp"
#include "cluster.hpp"
#include "detail/parallel.hpp"
#include "selectors.hpp"
#include "detail/validate.hpp"

namespace levattn::detail {
namespace {

constexpr index_t kAssignRows = 4096;                    // keys per assignment GEMM
constexpr index_t kRouteRows = 256;                      // queries per routing GEMM
constexpr float kNone = -std::numeric_limits<float>::infinity();

// Each key's cluster: the largest k.c - |c|^2 / 2 (the nearest centroid), ties to the lower one.
// Returns whether any key changed cluster.
bool assign(ConstMatrix K, const KeyClusters& kc, std::vector<index_t>& label) {
  const index_t n = K.rows, d = K.cols, c = kc.count, blocks = (n + kAssignRows - 1) / kAssignRows;
  std::vector<float> half(static_cast<std::size_t>(c));
  for (index_t j = 0; j < c; ++j) {
    double s = 0.0;
    for (index_t x = 0; x < d; ++x) s += static_cast<double>(kc.centroids[j * d + x]) * kc.centroids[j * d + x];
    half[j] = static_cast<float>(0.5 * s);
  }
  std::vector<char> changed(static_cast<std::size_t>(blocks), 0);
  const kernels::RowOps& ops = kernels::active_row_ops();
  const double flops = 2.0 * static_cast<double>(n) * static_cast<double>(c * d);
  parallel_tasks(blocks, flops, [] { return std::vector<float>(); }, [&](index_t b, std::vector<float>& tile) {
    const index_t r0 = b * kAssignRows, rows = std::min(kAssignRows, n - r0);
    tile.resize(static_cast<std::size_t>(rows * c));
    gemm_abt(rows, c, d, 1.0f, K.row(r0), K.ld, kc.centroids.data(), d, 0.0f, tile.data(), c);
    for (index_t r = 0; r < rows; ++r) {
      const index_t best = ops.argmax_shifted(tile.data() + r * c, half.data(), c);
      changed[b] |= label[r0 + r] != best;
      label[r0 + r] = best;
    }
  });
  return std::count(changed.begin(), changed.end(), 1) > 0;
}

// Centroids <- the mean of their keys (summed in key order); an empty cluster keeps its centroid.
void update(ConstMatrix K, const std::vector<index_t>& label, KeyClusters& kc) {
  const index_t d = K.cols;
  std::vector<double> sum(static_cast<std::size_t>(kc.count * d), 0.0);
  std::vector<index_t> count(static_cast<std::size_t>(kc.count), 0);
  for (index_t i = 0; i < K.rows; ++i) {
    ++count[label[i]];
    for (index_t x = 0; x < d; ++x) sum[label[i] * d + x] += K(i, x);
  }
  for (index_t j = 0; j < kc.count; ++j)
    if (count[j] > 0)
      for (index_t x = 0; x < d; ++x) kc.centroids[j * d + x] = static_cast<float>(sum[j * d + x] / static_cast<double>(count[j]));
}

// Which entries of a row its best k are: v > gt, and (tie_key >= 0) among v == cut the keys up
// to tie_key.
struct Keep {
  float gt, cut;
  index_t tie_key;  // -1: gt alone
  bool kept(float v, index_t key) const { return v > gt || (tie_key >= 0 && v == cut && key <= tie_key); }
};

// The rule that keeps the best k of v[0 .. count) (finite, or -inf for entries never kept; ties
// to the lower key: key(a) gives entry a's key, called only when ties straddle the k-th place).
template <class KeyOf>
Keep best_k(const kernels::RowOps& ops, const float* v, index_t count, index_t k, float best, KeyOf key,
            std::vector<float>& scratch) {
  if (ops.count_at_least(v, count, std::numeric_limits<float>::lowest()) <= k) return Keep{kNone, kNone, -1};
  const Kth cut = kth_largest(ops, v, count, k, best, scratch);
  const std::size_t quota = static_cast<std::size_t>(k) - cut.above;
  if (cut.equal <= quota) return Keep{std::nextafter(cut.value, kNone), cut.value, -1};
  std::vector<index_t> tied;
  for (index_t a = 0; a < count; ++a)
    if (v[a] == cut.value) tied.push_back(key(a));
  std::nth_element(tied.begin(), tied.begin() + static_cast<std::ptrdiff_t>(quota - 1), tied.end());
  return Keep{cut.value, cut.value, tied[quota - 1]};
}

[[noreturn]] void overflow() {
  fail(ErrorKind::invalid_argument, "cluster",
       "the scaled logits overflow float32; rescale queries or keys (or pass a smaller scale)");
}

// Up to this many probes a query's clusters are picked by insertion into a short sorted list:
// past the first few scores almost none enters it, where best_k's counting passes cost more.
constexpr index_t kFewProbes = 16;

// The p largest of s[0 .. c) (ties to the lower index; p <= min(c, kFewProbes)), ascending, into out.
void few_largest(const float* s, index_t c, index_t p, index_t* out) {
  std::array<float, kFewProbes> top;
  std::array<index_t, kFewProbes> at;
  index_t held = 0;
  for (index_t j = 0; j < c; ++j) {
    if (held == p && !(s[j] > top[p - 1])) continue;  // a tie comes later, so loses
    index_t a = held < p ? held++ : p - 1;
    for (; a > 0 && s[j] > top[a - 1]; --a) top[a] = top[a - 1], at[a] = at[a - 1];
    top[a] = s[j], at[a] = j;
  }
  std::copy_n(at.begin(), p, out);
  std::sort(out, out + p);
}

// Each query's p clusters of largest centroid score (power: |score|), ascending: rows x p.
void route(const kernels::KernelParams& params, ConstMatrix Q, const KeyClusters& kc, index_t p, index_t i0,
           index_t i1, ClusterWork& w, std::vector<index_t>& picked) {
  const index_t c = kc.count, d = kc.d;
  picked.resize(static_cast<std::size_t>((i1 - i0) * p));
  for (index_t r0 = i0; r0 < i1; r0 += kRouteRows) {
    const index_t rows = std::min(kRouteRows, i1 - r0);
    w.route.resize(static_cast<std::size_t>(rows * c));
    gemm_abt(rows, c, d, 1.0f, Q.row(r0), Q.ld, kc.centroids.data(), d, 0.0f, w.route.data(), c);
    if (params.check_overflow && params.ops->max_abs(w.route.data(), rows * c) < 0) overflow();
    for (index_t r = 0; r < rows; ++r) {
      float* s = w.route.data() + r * c;
      if (params.kernel == Kernel::power)
        for (index_t j = 0; j < c; ++j) s[j] = std::fabs(s[j]);
      index_t* out = picked.data() + (r0 - i0 + r) * p;
      if (p <= kFewProbes) {
        few_largest(s, c, p, out);
        continue;
      }
      const Keep keep = best_k(*params.ops, s, c, p, params.ops->row_max(s, c), [](index_t j) { return j; }, w.scratch);
      for (index_t j = 0, taken = 0; j < c; ++j)
        if (keep.kept(s[j], j)) out[taken++] = j;  // p of them: the scores are finite
    }
  }
}

// The run's per-cluster members and rank blocks (members x cluster size), and the offset of
// each (query, slot)'s ranks.
void index_run(const KeyClusters& kc, ClusterWork& w) {
  ClusterCandidates& cand = w.cand;
  const index_t p = cand.probe, c = kc.count;
  cand.member_start.assign(static_cast<std::size_t>(c + 1), 0);
  for (index_t a = 0; a < cand.rows * p; ++a) ++cand.member_start[cand.picked[a] + 1];
  for (index_t j = 0; j < c; ++j) cand.member_start[j + 1] += cand.member_start[j];
  w.block.assign(static_cast<std::size_t>(c + 1), 0);
  for (index_t j = 0; j < c; ++j)
    w.block[j + 1] = w.block[j] + static_cast<std::size_t>((cand.member_start[j + 1] - cand.member_start[j]) * kc.size(j));
  cand.member_row.resize(static_cast<std::size_t>(cand.rows * p));
  cand.member_slot.resize(cand.member_row.size());
  w.segment.resize(cand.member_row.size());
  std::vector<index_t> fill(cand.member_start.begin(), cand.member_start.end() - 1);
  for (index_t r = 0; r < cand.rows; ++r)
    for (index_t s = 0; s < p; ++s) {
      const index_t j = cand.picked[r * p + s], at = fill[j]++;
      cand.member_row[at] = r, cand.member_slot[at] = s;
      w.segment[r * p + s] = w.block[j] + static_cast<std::size_t>((at - cand.member_start[j]) * kc.size(j));
    }
}

// Ranks of every member query against every key of its probed clusters: per cluster and key
// tile one product for all the queries that probe it, written in place into the cluster's block.
void rank_run(const kernels::KernelParams& params, ConstMatrix Q, const KeyClusters& kc, const Excluded& ex,
              ClusterWork& w) {
  ClusterCandidates& cand = w.cand;
  const index_t d = kc.d;
  const bool softmax = params.kernel == Kernel::softmax;
  w.rank.resize(w.block[kc.count]);
  for (index_t j = 0; j < kc.count; ++j) {
    const index_t m0 = cand.member_start[j], cnt = cand.member_start[j + 1] - m0, size = kc.size(j);
    if (cnt == 0 || size == 0) continue;
    w.qs.resize(static_cast<std::size_t>(cnt * d));
    for (index_t a = 0; a < cnt; ++a) std::copy_n(Q.row(cand.i0 + cand.member_row[m0 + a]), d, w.qs.data() + a * d);
    float* block = w.rank.data() + w.block[j];
    for (index_t b0 = 0; b0 < size; b0 += kernels::kKeyTile) {
      const index_t tw = std::min(kernels::kKeyTile, size - b0);
      gemm_abt(cnt, tw, d, params.scale, w.qs.data(), d, kc.keys.data() + (kc.start[j] + b0) * d, d, 0.0f, block + b0,
               size);
    }
    if (params.check_overflow && params.ops->max_abs(block, cnt * size) < 0) overflow();
    if (softmax && !ex.keys && ex.window < 0 && !ex.causal) continue;
    const index_t* keys = kc.order.data() + kc.start[j];
    for (index_t a = 0; a < cnt; ++a) {
      float* t = block + a * size;
      const index_t i = cand.i0 + cand.member_row[m0 + a];
      for (index_t b = 0; b < size; ++b) {
        const bool out = (ex.keys && ex.keys[keys[b]]) || (ex.window >= 0 && std::abs(i - keys[b]) <= ex.window) ||
                         (ex.causal && keys[b] > i);
        t[b] = out ? kNone : softmax ? t[b] : std::fabs(t[b]);
      }
    }
  }
}

// Query r's best k among its candidates into the kept lists, slot by slot.
void keep_row(const kernels::RowOps& ops, const KeyClusters& kc, index_t k, index_t r, ClusterWork& w) {
  ClusterCandidates& cand = w.cand;
  const index_t p = cand.probe;
  const index_t* picked = cand.picked.data() + r * p;
  w.row.clear();
  for (index_t s = 0; s < p; ++s) {  // the query's ranks, contiguous
    const float* seg = w.rank.data() + w.segment[r * p + s];
    w.row.insert(w.row.end(), seg, seg + kc.size(picked[s]));
  }
  const auto count = static_cast<index_t>(w.row.size());
  const float* v = w.row.data();
  cand.best[r] = ops.row_max(v, count);
  const auto key_of = [&](index_t a) {
    index_t s = 0;
    for (; a >= kc.size(picked[s]); ++s) a -= kc.size(picked[s]);
    return kc.order[kc.start[picked[s]] + a];
  };
  const Keep keep = best_k(ops, v, count, k, cand.best[r], key_of, w.scratch);
  std::size_t in = cand.kept_start[r * p];
  for (index_t s = 0, a = 0; s < p; ++s) {  // branch-free compaction, slot by slot
    const index_t j = picked[s], size = kc.size(j);
    const index_t* keys = kc.order.data() + kc.start[j];
    if (keep.tie_key < 0) {
      for (index_t b = 0; b < size; ++b, ++a) {
        cand.kept_rank[in] = v[a], cand.kept_index[in] = b;
        in += static_cast<std::size_t>(v[a] > keep.gt);
      }
    } else {
      for (index_t b = 0; b < size; ++b, ++a) {
        cand.kept_rank[in] = v[a], cand.kept_index[in] = b;
        in += static_cast<std::size_t>(keep.kept(v[a], keys[b]));
      }
    }
    cand.kept_start[r * p + s + 1] = in;
  }
}

}  // namespace

KeyClusters cluster_keys(ConstMatrix K, index_t clusters, index_t iterations, const CounterRng& starts,
                         const CounterRng& sample) {
  const index_t n = K.rows, d = K.cols;
  KeyClusters kc;
  kc.count = std::clamp<index_t>(clusters, 1, n), kc.d = d;
  // The training keys (ascending, so that each mean sums them in key order) and the starts.
  const index_t train = std::min(n, kTrainPerCluster * kc.count);
  std::vector<float> rows;
  ConstMatrix T = K;
  if (train < n) {
    const std::vector<index_t> picked = random_keys(n, train, sample);
    rows.resize(static_cast<std::size_t>(train * d));
    for (index_t a = 0; a < train; ++a) std::copy_n(K.row(picked[a]), d, rows.data() + a * d);
    T = ConstMatrix{rows.data(), train, d};
  }
  const std::vector<index_t> first = random_keys(train, kc.count, starts);
  kc.centroids.resize(static_cast<std::size_t>(kc.count * d));
  for (index_t j = 0; j < kc.count; ++j) std::copy_n(T.row(first[j]), d, kc.centroids.data() + j * d);
  std::vector<index_t> label(static_cast<std::size_t>(train), -1);
  for (index_t it = 0; it < std::max<index_t>(iterations, 1); ++it) {
    if (!assign(T, kc, label) && it > 0) break;
    update(T, label, kc);
  }
  if (train < n) {
    label.assign(static_cast<std::size_t>(n), -1);
    assign(K, kc, label);
  }
  // Keys cluster by cluster (a counting sort keeps them ascending within a cluster).
  kc.start.assign(static_cast<std::size_t>(kc.count + 1), 0);
  for (index_t i = 0; i < n; ++i) ++kc.start[label[i] + 1];
  for (index_t j = 0; j < kc.count; ++j) kc.start[j + 1] += kc.start[j];
  std::vector<index_t> fill(kc.start.begin(), kc.start.end() - 1);
  kc.order.resize(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) kc.order[fill[label[i]]++] = i;
  kc.keys = in_cluster_order(K, kc);
  return kc;
}

std::vector<float> in_cluster_order(ConstMatrix M, const KeyClusters& kc) {
  std::vector<float> out(static_cast<std::size_t>(M.rows * M.cols));
  for (index_t a = 0; a < M.rows; ++a) std::copy_n(M.row(kc.order[a]), M.cols, out.data() + a * M.cols);
  return out;
}

void search_clusters(const kernels::KernelParams& params, ConstMatrix Q, const KeyClusters& kc, index_t probe,
                     index_t k, index_t i0, index_t i1, const Excluded& excluded, ClusterWork& w,
                     const std::function<void(const ClusterCandidates&)>& visit, std::size_t run_ranks) {
  const index_t p = std::clamp<index_t>(probe, 1, kc.count);
  std::vector<index_t> picked;
  route(params, Q, kc, p, i0, i1, w, picked);
  ClusterCandidates& cand = w.cand;
  cand.probe = p;
  for (index_t r0 = 0; r0 < i1 - i0;) {
    // The longest run from r0 whose candidates fit the buffer (at least one query).
    index_t r1 = r0;
    for (std::size_t total = 0; r1 < i1 - i0; ++r1) {
      std::size_t mine = 0;
      for (index_t s = 0; s < p; ++s) mine += static_cast<std::size_t>(kc.size(picked[r1 * p + s]));
      if (r1 > r0 && total + mine > run_ranks) break;
      total += mine;
    }
    cand.i0 = i0 + r0, cand.rows = r1 - r0;
    cand.picked.assign(picked.begin() + r0 * p, picked.begin() + r1 * p);
    index_run(kc, w);
    rank_run(params, Q, kc, excluded, w);
    cand.best.resize(static_cast<std::size_t>(cand.rows));
    cand.kept_start.assign(static_cast<std::size_t>(cand.rows * p + 1), 0);
    // At most k per query and no more than its candidates; + 1: the compaction's spare write.
    cand.kept_rank.resize(std::min(static_cast<std::size_t>(cand.rows * k), w.block[kc.count]) + 1);
    cand.kept_index.resize(cand.kept_rank.size());
    for (index_t r = 0; r < cand.rows; ++r) keep_row(*params.ops, kc, k, r, w);  // each starts where the last ended
    visit(cand);
    r0 = r1;
  }
}

void kept_keys(const ClusterCandidates& cand, const KeyClusters& kc, index_t k, index_t* out) {
  std::vector<index_t> kept;
  const index_t p = cand.probe;
  for (index_t r = 0; r < cand.rows; ++r) {
    kept.clear();
    for (index_t s = 0; s < p; ++s) {
      const index_t first = kc.start[cand.picked[r * p + s]];
      for (std::size_t e = cand.kept_start[r * p + s]; e < cand.kept_start[r * p + s + 1]; ++e)
        kept.push_back(kc.order[first + cand.kept_index[e]]);
    }
    std::sort(kept.begin(), kept.end());  // at most k: the search kept each row's best k
    for (index_t a = 0; a < k; ++a) out[r * k + a] = a < static_cast<index_t>(kept.size()) ? kept[a] : -1;
  }
}

namespace {

// A cluster whose members keep at least this share of its (query, key) pairs is attended by one
// dense product of their weights (zero where not kept) with its value rows; sparser ones query by
// query over gathered rows. The product does up to 4x the needed multiply-adds at several times
// the gathered rate.
constexpr double kDenseShare = 0.25;

// Member a's weights of its kept keys in cluster j, exp(s - best) or (|s| / best)^p, into
// w.weights; adds their sum to w.sum[r]. Returns how many it keeps (0: no weight).
index_t member_weights(const kernels::KernelParams& params, const ClusterCandidates& cand, index_t r, index_t slot,
                       ClusterAttendWork& w) {
  const std::size_t e0 = cand.kept_start[slot];
  const auto in = static_cast<index_t>(cand.kept_start[slot + 1] - e0);
  const float best = cand.best[r];
  const bool softmax = params.kernel == Kernel::softmax;
  if (in == 0 || (!softmax && !(best > 0.0f))) return 0;
  w.weights.assign(cand.kept_rank.begin() + static_cast<std::ptrdiff_t>(e0),
                   cand.kept_rank.begin() + static_cast<std::ptrdiff_t>(e0 + static_cast<std::size_t>(in)));
  w.sum[r] += static_cast<double>(softmax ? params.ops->exp_shift_sum(w.weights.data(), in, best)
                                          : params.ops->power_rel_sum(w.weights.data(), in, best, params.p));
  return in;
}

}  // namespace

double attend_candidates(const kernels::KernelParams& params, const ClusterCandidates& cand, const KeyClusters& kc,
                          const float* values, index_t dv, ClusterAttendWork& w, float* out, float* stat) {
  const bool softmax = params.kernel == Kernel::softmax;
  w.acc.assign(static_cast<std::size_t>(cand.rows * dv), 0.0f);
  w.sum.assign(static_cast<std::size_t>(cand.rows), 0.0);
  double kept = 0.0;
  for (index_t j = 0; j < kc.count; ++j) {
    const index_t m0 = cand.member_start[j], cnt = cand.member_start[j + 1] - m0, size = kc.size(j);
    if (cnt == 0 || size == 0) continue;
    const float* vj = values + kc.start[j] * dv;
    std::size_t pairs = 0;
    for (index_t a = 0; a < cnt; ++a) {
      const index_t slot = cand.member_row[m0 + a] * cand.probe + cand.member_slot[m0 + a];
      pairs += cand.kept_start[slot + 1] - cand.kept_start[slot];
    }
    kept += static_cast<double>(pairs);
    if (static_cast<double>(pairs) >= kDenseShare * static_cast<double>(cnt * size)) {
      // W (cnt x size) holds each member's weights at its kept keys; T = W V_j, row a added to
      // its query's accumulator.
      w.dense.assign(static_cast<std::size_t>(cnt * size), 0.0f);
      for (index_t a = 0; a < cnt; ++a) {
        const index_t r = cand.member_row[m0 + a], slot = r * cand.probe + cand.member_slot[m0 + a];
        const index_t in = member_weights(params, cand, r, slot, w);
        const index_t* at = cand.kept_index.data() + cand.kept_start[slot];
        for (index_t e = 0; e < in; ++e) w.dense[a * size + at[e]] = w.weights[e];
      }
      w.product.resize(static_cast<std::size_t>(cnt * dv));
      gemm_ab(cnt, dv, size, 1.0f, w.dense.data(), size, vj, dv, 0.0f, w.product.data(), dv);
      for (index_t a = 0; a < cnt; ++a) {
        float* acc = w.acc.data() + cand.member_row[m0 + a] * dv;
        for (index_t x = 0; x < dv; ++x) acc[x] += w.product[a * dv + x];
      }
      continue;
    }
    // Each query of the cluster in turn, while its keys' value rows stay in cache.
    for (index_t a = 0; a < cnt; ++a) {
      const index_t r = cand.member_row[m0 + a], slot = r * cand.probe + cand.member_slot[m0 + a];
      const index_t in = member_weights(params, cand, r, slot, w);
      if (in > 0)
        params.ops->gathered_weighted_sum(w.weights.data(), cand.kept_index.data() + cand.kept_start[slot], in, vj,
                                          dv, dv, w.acc.data() + r * dv);
    }
  }
  for (index_t r = 0; r < cand.rows; ++r) {
    const double l = w.sum[r];
    const bool empty = !(l > 0.0);
    for (index_t x = 0; x < dv; ++x) out[r * dv + x] = empty ? 0.0f : static_cast<float>(w.acc[r * dv + x] / l);
    const double top = softmax ? static_cast<double>(cand.best[r]) : params.p * std::log(static_cast<double>(cand.best[r]));
    stat[r] = empty ? std::numeric_limits<float>::infinity() : static_cast<float>(top + std::log(l));
  }
  return kept;
}

}  // namespace levattn::detail
