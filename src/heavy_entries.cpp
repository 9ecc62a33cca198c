// Exact heavy entries of x^2 attention (math.md 1.2): Z_i = q_i^T M q_i, then only keys of U_eps.
#include "levattn/heavy_entries.hpp"

#include <algorithm>
#include <limits>
#include <sstream>

#include "detail/blas.hpp"
#include "detail/leverage.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {

HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps) {
  detail::require_eps(eps);
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  if (Q.cols != K.cols) {
    std::ostringstream os;
    os << "queries: expected " << K.cols << " columns (the keys' dimension), got " << Q.cols;
    detail::invalid(os.str());
  }
  const index_t m = Q.rows, d = K.cols;
  const KeyGram g = key_gram(K);
  const UniversalSet U = universal_set(detail::scores_unchecked(K, g), eps);
  const index_t u = static_cast<index_t>(U.indices.size());

  HeavyEntries out;
  out.universal_size = u;
  out.rank = g.rank;

  // Keys of U in float64 (|U| x d), so the dot products are not the accuracy bottleneck.
  std::vector<double> KU(static_cast<std::size_t>(u * d));
  for (index_t a = 0; a < u; ++a)
    for (index_t j = 0; j < d; ++j) KU[a * d + j] = K(U.indices[a], j);
  const double lmax = std::max(g.eigenvalues.empty() ? 0.0 : g.eigenvalues[0], 0.0);
  const double zero_tol = 64.0 * std::numeric_limits<double>::epsilon() * lmax;

  constexpr index_t kRows = 256;
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<std::vector<HeavyEntry>> found(static_cast<std::size_t>(blocks));
  std::vector<std::vector<index_t>> zeros(static_cast<std::size_t>(blocks));
  detail::ExceptionTrap trap;
#pragma omp parallel
  {
    std::vector<double> q, t, dots;
#pragma omp for schedule(dynamic, 1)
    for (index_t b = 0; b < blocks; ++b) {
      trap.run([&] {
        const index_t r0 = b * kRows, rows = std::min(kRows, m - r0);
        q.resize(static_cast<std::size_t>(rows * d));
        t.resize(static_cast<std::size_t>(rows * d));
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < d; ++j) q[i * d + j] = Q(r0 + i, j);
        // T = Q_b M, Z_i = <T_i, q_i>: the exact normaliser sum_l (q_i.k_l)^2 in O(d^2).
        detail::dgemm_ab(rows, d, d, 1.0, q.data(), d, g.gram.data(), d, 0.0, t.data(), d);
        if (u > 0) {
          dots.resize(static_cast<std::size_t>(rows * u));
          detail::dgemm_abt(rows, u, d, 1.0, q.data(), d, KU.data(), d, 0.0, dots.data(), u);
        }
        for (index_t i = 0; i < rows; ++i) {
          double z = 0.0, qq = 0.0;
          for (index_t j = 0; j < d; ++j) {
            z += t[i * d + j] * q[i * d + j];
            qq += q[i * d + j] * q[i * d + j];
          }
          if (z <= zero_tol * qq) {
            zeros[b].push_back(r0 + i);
            continue;
          }
          for (index_t a = 0; a < u; ++a) {
            const double x = dots[i * u + a];
            const double v = x * x / z;
            if (v >= eps) found[b].push_back({r0 + i, U.indices[a], v});
          }
        }
      });
    }
  }
  trap.rethrow();
  for (index_t b = 0; b < blocks; ++b) {
    out.entries.insert(out.entries.end(), found[b].begin(), found[b].end());
    out.zero_rows.insert(out.zero_rows.end(), zeros[b].begin(), zeros[b].end());
  }
  return out;
}

}  // namespace levattn
