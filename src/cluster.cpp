// k-means over one head's keys and the clustered per-query top-k search (Select::cluster).
#include <algorithm>
#include <cmath>

#include "detail/blas.hpp"
#include "detail/cluster.hpp"
#include "detail/selection.hpp"

namespace levattn::detail {
namespace {

constexpr index_t kAssignRows = 4096;  // keys per assignment GEMM

// Each key's cluster: the largest k.c - |c|^2 / 2 (the nearest centroid), ties to the lower one.
// Returns whether any key changed cluster.
bool assign(ConstMatrix K, const KeyClusters& kc, std::vector<index_t>& label, std::vector<float>& tile) {
  const index_t n = K.rows, d = K.cols, c = kc.count;
  std::vector<float> half(static_cast<std::size_t>(c));
  for (index_t j = 0; j < c; ++j) {
    double s = 0.0;
    for (index_t x = 0; x < d; ++x) s += static_cast<double>(kc.centroids[j * d + x]) * kc.centroids[j * d + x];
    half[j] = static_cast<float>(0.5 * s);
  }
  bool changed = false;
  tile.resize(static_cast<std::size_t>(std::min(n, kAssignRows) * c));
  for (index_t r0 = 0; r0 < n; r0 += kAssignRows) {
    const index_t rows = std::min(kAssignRows, n - r0);
    gemm_abt(rows, c, d, 1.0f, K.row(r0), K.ld, kc.centroids.data(), d, 0.0f, tile.data(), c);
    for (index_t r = 0; r < rows; ++r) {
      const float* t = tile.data() + r * c;
      index_t best = 0;
      for (index_t j = 1; j < c; ++j)
        if (t[j] - half[j] > t[best] - half[best]) best = j;
      changed |= label[r0 + r] != best;
      label[r0 + r] = best;
    }
  }
  return changed;
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

}  // namespace

KeyClusters cluster_keys(ConstMatrix K, index_t clusters, index_t iterations, const CounterRng& rng) {
  const index_t n = K.rows, d = K.cols;
  KeyClusters kc;
  kc.count = std::clamp<index_t>(clusters, 1, n), kc.d = d;
  const std::vector<index_t> first = random_keys(n, kc.count, rng);
  kc.centroids.resize(static_cast<std::size_t>(kc.count * d));
  for (index_t j = 0; j < kc.count; ++j) std::copy_n(K.row(first[j]), d, kc.centroids.data() + j * d);
  std::vector<index_t> label(static_cast<std::size_t>(n), -1);
  std::vector<float> tile;
  for (index_t it = 0; it < std::max<index_t>(iterations, 1); ++it) {
    if (!assign(K, kc, label, tile) && it > 0) break;
    update(K, label, kc);
  }
  // Keys cluster by cluster (a counting sort keeps them ascending within a cluster).
  kc.start.assign(static_cast<std::size_t>(kc.count + 1), 0);
  for (index_t i = 0; i < n; ++i) ++kc.start[label[i] + 1];
  for (index_t j = 0; j < kc.count; ++j) kc.start[j + 1] += kc.start[j];
  std::vector<index_t> fill(kc.start.begin(), kc.start.end() - 1);
  kc.order.resize(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) kc.order[fill[label[i]]++] = i;
  kc.keys.resize(static_cast<std::size_t>(n * d));
  for (index_t a = 0; a < n; ++a) std::copy_n(K.row(kc.order[a]), d, kc.keys.data() + a * d);
  return kc;
}

void clustered_top_keys(const kernels::KernelParams& params, ConstMatrix Q, const KeyClusters& kc,
                        index_t probe, index_t k, index_t i0, index_t i1, const char* excluded,
                        index_t window, index_t* out) {
  const index_t rows = i1 - i0, c = kc.count, d = kc.d, p = std::clamp<index_t>(probe, 1, c);
  const bool softmax = params.kernel == Kernel::softmax;
  // Route: each query's p clusters of largest centroid score, then the queries of each cluster.
  std::vector<float> route(static_cast<std::size_t>(rows * c));
  gemm_abt(rows, c, d, 1.0f, Q.row(i0), Q.ld, kc.centroids.data(), d, 0.0f, route.data(), c);
  std::vector<std::vector<index_t>> members(static_cast<std::size_t>(c));
  std::vector<index_t> picked(static_cast<std::size_t>(p));
  BestKeys routes(p);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t j = 0; j < c; ++j) routes.push(softmax ? route[r * c + j] : std::fabs(route[r * c + j]), j);
    routes.write(picked.data());
    for (index_t j : picked) members[j].push_back(r);
  }
  // Search: per cluster, its queries' logits against its keys in one product; each query's
  // candidates are kept whole and cut to the best k once (cheaper than a heap per push).
  using Item = std::pair<float, index_t>;
  const auto stronger = [](const Item& a, const Item& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; };
  std::vector<std::vector<Item>> cand(static_cast<std::size_t>(rows));
  const auto expected = static_cast<std::size_t>(2 * p * (kc.start[c] / c) + 16);
  for (auto& list : cand) list.reserve(expected);
  std::vector<float> qs, tile;
  for (index_t j = 0; j < c; ++j) {
    const index_t cnt = static_cast<index_t>(members[j].size()), size = kc.start[j + 1] - kc.start[j];
    if (cnt == 0 || size == 0) continue;
    qs.resize(static_cast<std::size_t>(cnt * d));
    for (index_t a = 0; a < cnt; ++a) std::copy_n(Q.row(i0 + members[j][a]), d, qs.data() + a * d);
    for (index_t b0 = 0; b0 < size; b0 += kernels::kKeyTile) {
      const index_t w = std::min(kernels::kKeyTile, size - b0), first = kc.start[j] + b0;
      tile.resize(static_cast<std::size_t>(cnt * w));
      gemm_abt(cnt, w, d, params.scale, qs.data(), d, kc.keys.data() + first * d, d, 0.0f, tile.data(), w);
      const index_t* keys = kc.order.data() + first;
      for (index_t a = 0; a < cnt; ++a) {
        const index_t r = members[j][a], i = i0 + r;
        auto& list = cand[r];
        const float* t = tile.data() + a * w;
        if (!excluded && window < 0 && softmax) {
          for (index_t b = 0; b < w; ++b) list.emplace_back(t[b], keys[b]);
          continue;
        }
        for (index_t b = 0; b < w; ++b) {
          if ((excluded && excluded[keys[b]]) || (window >= 0 && std::abs(i - keys[b]) <= window)) continue;
          list.emplace_back(softmax ? t[b] : std::fabs(t[b]), keys[b]);
        }
      }
    }
  }
  for (index_t r = 0; r < rows; ++r) {
    auto& list = cand[r];
    const index_t keep = std::min<index_t>(k, static_cast<index_t>(list.size()));
    std::nth_element(list.begin(), list.begin() + keep, list.end(), stronger);
    std::sort(list.begin(), list.begin() + keep, stronger);
    for (index_t a = 0; a < k; ++a) out[r * k + a] = a < keep ? list[a].second : -1;
  }
}

}  // namespace levattn::detail
