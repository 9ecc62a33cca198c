#include "levattn/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <sstream>

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
#pragma omp parallel
  {
    std::vector<double> q(static_cast<std::size_t>(kRows * d)), dots(static_cast<std::size_t>(kRows * n));
#pragma omp for schedule(dynamic, 1)
    for (index_t b = 0; b < blocks; ++b) {
      const index_t i0 = b * kRows, rows = std::min(kRows, m - i0);
      for (index_t r = 0; r < rows; ++r)
        for (index_t c = 0; c < d; ++c) q[r * d + c] = Q(i0 + r, c);
      detail::dgemm_abt(rows, n, d, 1.0, q.data(), d, k64.data(), d, 0.0, dots.data(), n);
      for (index_t r = 0; r < rows; ++r) {
        double* s = dots.data() + r * n;
        double z = 0.0;
        for (index_t j = 0; j < n; ++j) z += (s[j] = s[j] * s[j]);
        if (z == 0.0) {
          zero[b].push_back(i0 + r);
          continue;
        }
        for (index_t j = 0; j < n; ++j)
          if (s[j] / z >= eps) found[b].push_back({i0 + r, j, s[j] / z});
      }
    }
  }
  HeavyEntries out;
  for (index_t b = 0; b < blocks; ++b) {
    out.entries.insert(out.entries.end(), found[b].begin(), found[b].end());
    out.zero_rows.insert(out.zero_rows.end(), zero[b].begin(), zero[b].end());
  }
  return out;
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
  const index_t m = Q.rows, n = K.rows, d = K.cols, dv = V.cols;
  const bool per_query = options.select == Select::topk;
  const bool full = options.select == Select::full;
  if ((!full && !per_query && selection.shared_keys.empty()) ||
      (per_query && (selection.query_keys.empty() || selection.query_keys.size() % static_cast<std::size_t>(m) != 0)))
    detail::invalid("selection_metrics: the selection was not returned (set return_selection)");
  for (index_t j : per_query ? selection.query_keys : (full ? std::vector<index_t>{} : selection.shared_keys[0]))
    if (j < 0 || j >= n) detail::invalid("selection_metrics: a selected key index is out of range");
  const index_t k = per_query ? static_cast<index_t>(selection.query_keys.size()) / std::max<index_t>(m, 1) : 0;
  std::vector<char> shared(static_cast<std::size_t>(n), full ? 1 : 0);
  if (!full && !per_query)
    for (index_t j : selection.shared_keys[0]) shared[j] = 1;
  const double scale = !std::isnan(options.scale)
                           ? options.scale
                           : (options.kernel == Kernel::softmax ? 1.0 / std::sqrt(static_cast<double>(d)) : 1.0);

  constexpr index_t kRows = 32;
  SelectionMetrics out;
  double mass = 0.0, err2 = 0.0, ref2 = 0.0;
  index_t heavy = 0, heavy_sel = 0;
#pragma omp parallel reduction(+ : mass, err2, ref2, heavy, heavy_sel)
  {
    std::vector<float> s(static_cast<std::size_t>(kRows * n)), o(static_cast<std::size_t>(kRows * dv));
    std::vector<char> mask(static_cast<std::size_t>(n));
#pragma omp for schedule(dynamic, 1)
    for (index_t i0 = 0; i0 < m; i0 += kRows) {
      const index_t rows = std::min(kRows, m - i0);
      detail::gemm_abt(rows, n, d, static_cast<float>(scale), Q.row(i0), Q.ld, K.data, K.ld, 0.0f,
                       s.data(), n);
      for (index_t r = 0; r < rows; ++r) {
        const index_t i = i0 + r;
        float* a = s.data() + r * n;
        double z = 0.0;
        if (options.kernel == Kernel::softmax) {
          const float mx = *std::max_element(a, a + n);
          for (index_t j = 0; j < n; ++j) z += (a[j] = static_cast<float>(std::exp(static_cast<double>(a[j]) - mx)));
        } else {
          for (index_t j = 0; j < n; ++j)
            z += (a[j] = static_cast<float>(std::pow(std::fabs(static_cast<double>(a[j])), options.p)));
        }
        std::copy(shared.begin(), shared.end(), mask.begin());
        if (options.window >= 0)
          for (index_t j = std::max<index_t>(0, i - options.window);
               j <= std::min(n - 1, i + options.window); ++j)
            mask[j] = 1;
        if (per_query)
          for (index_t c = 0; c < k; ++c) mask[selection.query_keys[i * k + c]] = 1;
        double captured = 0.0;
        for (index_t j = 0; j < n; ++j) {
          const double w = z > 0 ? a[j] / z : 0.0;
          a[j] = static_cast<float>(w);
          if (mask[j]) captured += w;
          if (w >= heavy_eps) {
            ++heavy;
            heavy_sel += mask[j] ? 1 : 0;
          }
        }
        mass += captured;
      }
      detail::gemm_ab(rows, dv, n, 1.0f, s.data(), n, V.data, V.ld, 0.0f, o.data(), dv);
      for (index_t r = 0; r < rows; ++r)
        for (index_t c = 0; c < dv; ++c) {
          const double ref = o[r * dv + c], diff = approx[(i0 + r) * dv + c] - ref;
          err2 += diff * diff;
          ref2 += ref * ref;
        }
    }
  }
  out.heavy_total = heavy;
  out.heavy_selected = heavy_sel;
  out.heavy_recall = heavy > 0 ? static_cast<double>(heavy_sel) / static_cast<double>(heavy) : 1.0;
  out.mass_captured = mass / static_cast<double>(m);
  out.output_error = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
  return out;
}

}  // namespace levattn
