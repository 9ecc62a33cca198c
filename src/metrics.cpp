#include "levattn/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <tuple>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"

namespace levattn {

HeavyEntries heavy_entries_brute_force(ConstMatrix Q, ConstMatrix K, double eps) {
  detail::require_eps(eps);
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  if (Q.cols != K.cols) detail::invalid("queries: column count differs from the keys'");
  const index_t m = Q.rows, n = K.rows, d = K.cols;
  // Every dot product q_i.k_l in float64 (blocked DGEMM), no use of M or of leverage scores.
  std::vector<double> k64(static_cast<std::size_t>(n * d));
  for (index_t j = 0; j < n; ++j)
    for (index_t c = 0; c < d; ++c) k64[j * d + c] = K(j, c);
  constexpr index_t kRows = 32;
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<std::vector<HeavyEntry>> found(static_cast<std::size_t>(blocks));
  std::vector<std::vector<index_t>> zero(static_cast<std::size_t>(blocks));
  struct Workspace {
    std::vector<double> q, dots;
  };
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(d);
  const auto make = [&] {
    return Workspace{std::vector<double>(static_cast<std::size_t>(kRows * d)),
                     std::vector<double>(static_cast<std::size_t>(kRows * n))};
  };
  detail::parallel_tasks(blocks, flops, make, [&](index_t b, Workspace& w) {
    const index_t i0 = b * kRows, rows = std::min(kRows, m - i0);
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < d; ++c) w.q[r * d + c] = Q(i0 + r, c);
    detail::dgemm_abt(rows, n, d, 1.0, w.q.data(), d, k64.data(), d, 0.0, w.dots.data(), n);
    for (index_t r = 0; r < rows; ++r) {
      double* s = w.dots.data() + r * n;
      double z = 0.0;
      for (index_t j = 0; j < n; ++j) z += (s[j] = s[j] * s[j]);
      if (z == 0.0) {
        zero[b].push_back(i0 + r);
        continue;
      }
      for (index_t j = 0; j < n; ++j)
        if (s[j] / z >= eps) found[b].push_back({i0 + r, j, s[j] / z});
    }
  });
  HeavyEntries out;
  for (index_t b = 0; b < blocks; ++b) {
    out.entries.insert(out.entries.end(), found[b].begin(), found[b].end());
    out.zero_rows.insert(out.zero_rows.end(), zero[b].begin(), zero[b].end());
  }
  return out;
}

HeavyAgreement compare_heavy_entries(const HeavyEntries& found, const HeavyEntries& truth) {
  HeavyAgreement a;
  const auto& f = found.entries;
  const auto& t = truth.entries;
  for (std::size_t x = 0, y = 0; x < f.size() && y < t.size();) {
    if (f[x].query == t[y].query && f[x].key == t[y].key) {
      a.max_rel_value_error = std::max(a.max_rel_value_error, std::fabs(f[x].value - t[y].value) / t[y].value);
      ++a.common, ++x, ++y;
    } else if (std::tie(f[x].query, f[x].key) < std::tie(t[y].query, t[y].key)) {
      ++x;
    } else {
      ++y;
    }
  }
  if (!t.empty()) a.recall = static_cast<double>(a.common) / static_cast<double>(t.size());
  if (!f.empty()) a.precision = static_cast<double>(a.common) / static_cast<double>(f.size());
  return a;
}

SelectionMetrics selection_metrics(ConstMatrix Q, ConstMatrix K, ConstMatrix V,
                                   const float* approx, const AttentionOptions& options,
                                   const AttentionResult& selection, double heavy_eps) {
  detail::require_eps(heavy_eps, "heavy_eps");
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  detail::require_finite_matrix(V, "values");
  if (Q.cols != K.cols || V.rows != K.rows)
    detail::invalid("selection_metrics: expected queries and keys of equal d and one value per key");
  if (approx == nullptr) detail::invalid("selection_metrics: null approximate output");
  if (options.causal)
    detail::invalid("selection_metrics: compares with non-causal full attention; causal selections are not supported");
  const index_t m = Q.rows, n = K.rows, d = K.cols, dv = V.cols;
  // Per-query keys (topk, cluster; -1 marks an unused slot) besides the shared set and window.
  const bool per_query = options.select == Select::topk || options.select == Select::cluster;
  const bool full = options.select == Select::full;
  if ((!full && !per_query && selection.shared_keys.empty()) ||
      (per_query && (selection.query_keys.empty() || selection.query_keys.size() % static_cast<std::size_t>(m) != 0)))
    detail::invalid("selection_metrics: the selection was not returned (set return_selection)");
  const bool has_shared = !full && !selection.shared_keys.empty();
  for (index_t j : has_shared ? selection.shared_keys[0] : std::vector<index_t>{})
    if (j < 0 || j >= n) detail::invalid("selection_metrics: a selected key index is out of range");
  for (index_t j : selection.query_keys)
    if (j < -1 || j >= n) detail::invalid("selection_metrics: a selected key index is out of range");
  const index_t k = per_query ? static_cast<index_t>(selection.query_keys.size()) / std::max<index_t>(m, 1) : 0;
  std::vector<char> shared(static_cast<std::size_t>(n), full ? 1 : 0);
  if (has_shared)
    for (index_t j : selection.shared_keys[0]) shared[j] = 1;
  const double scale = !std::isnan(options.scale)
                           ? options.scale
                           : (options.kernel == Kernel::softmax ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0);

  constexpr index_t kRows = 32;
  SelectionMetrics out;
  // Per block of queries, summed in block order afterwards (the same for any thread count).
  struct Partial {
    double mass = 0.0, err2 = 0.0, ref2 = 0.0;
    index_t heavy = 0, heavy_sel = 0;
  };
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<Partial> parts(static_cast<std::size_t>(blocks));
  struct Workspace {
    std::vector<float> s, o;
    std::vector<char> mask;
  };
  const auto make = [&] {
    return Workspace{std::vector<float>(static_cast<std::size_t>(kRows * n)),
                     std::vector<float>(static_cast<std::size_t>(kRows * dv)),
                     std::vector<char>(static_cast<std::size_t>(n))};
  };
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(d + dv);
  detail::parallel_tasks(blocks, flops, make, [&](index_t b, Workspace& w) {
    const index_t i0 = b * kRows, rows = std::min(kRows, m - i0);
    Partial& p = parts[b];
    detail::gemm_abt(rows, n, d, static_cast<float>(scale), Q.row(i0), Q.ld, K.data, K.ld, 0.0f, w.s.data(), n);
    for (index_t r = 0; r < rows; ++r) {
      const index_t i = i0 + r;
      float* a = w.s.data() + r * n;
      double z = 0.0;
      if (options.kernel == Kernel::softmax) {
        const float mx = *std::max_element(a, a + n);
        for (index_t j = 0; j < n; ++j) z += (a[j] = static_cast<float>(std::exp(static_cast<double>(a[j]) - mx)));
      } else {
        for (index_t j = 0; j < n; ++j)
          z += (a[j] = static_cast<float>(std::pow(std::fabs(static_cast<double>(a[j])), options.p)));
      }
      std::copy(shared.begin(), shared.end(), w.mask.begin());
      if (options.window >= 0)
        for (index_t j = std::max<index_t>(0, i - options.window); j <= std::min(n - 1, i + options.window); ++j)
          w.mask[j] = 1;
      if (per_query)
        for (index_t c = 0; c < k; ++c)
          if (selection.query_keys[i * k + c] >= 0) w.mask[selection.query_keys[i * k + c]] = 1;
      for (index_t j = 0; j < n; ++j) {
        const double wt = z > 0 ? a[j] / z : 0.0;
        a[j] = static_cast<float>(wt);
        if (w.mask[j]) p.mass += wt;
        if (wt >= heavy_eps) {
          ++p.heavy;
          p.heavy_sel += w.mask[j] ? 1 : 0;
        }
      }
    }
    detail::gemm_ab(rows, dv, n, 1.0f, w.s.data(), n, V.data, V.ld, 0.0f, w.o.data(), dv);
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < dv; ++c) {
        const double ref = w.o[r * dv + c], diff = approx[(i0 + r) * dv + c] - ref;
        p.err2 += diff * diff;
        p.ref2 += ref * ref;
      }
  });
  double mass = 0.0, err2 = 0.0, ref2 = 0.0;
  index_t heavy = 0, heavy_sel = 0;
  for (const Partial& p : parts) {
    mass += p.mass;
    err2 += p.err2;
    ref2 += p.ref2;
    heavy += p.heavy;
    heavy_sel += p.heavy_sel;
  }
  out.heavy_total = heavy;
  out.heavy_selected = heavy_sel;
  out.heavy_recall = heavy > 0 ? static_cast<double>(heavy_sel) / static_cast<double>(heavy) : 1.0;
  out.mass_captured = mass / static_cast<double>(m);
  out.output_error = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  return out;
}

}  // namespace levattn
