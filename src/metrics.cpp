#include "levattn/metrics.hpp"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"

namespace levattn {

HeavyEntries heavy_entries_brute_force(ConstMatrix Q, ConstMatrix K, double eps) {
  detail::require_eps(eps);
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  LEVATTN_REQUIRE(Q.cols == K.cols, "queries", "column count differs from the keys'");
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

}  // namespace levattn
