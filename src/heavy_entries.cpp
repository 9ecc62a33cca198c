// Exact heavy entries of x^2 attention (docs/design.md): Z_i = q_i^T M q_i, then only keys of U_eps.
#include "levattn/heavy_entries.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "detail/blas.hpp"
#include "detail/leverage.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "detail/rng.hpp"
#include "levattn/lewis_weights.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {

namespace {

void check_inputs(ConstMatrix Q, ConstMatrix K, double eps) {
  detail::require_eps(eps);
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  if (Q.cols != K.cols) {
    std::ostringstream os;
    os << "queries: expected " << K.cols << " columns (the keys' dimension), got " << Q.cols;
    detail::invalid(os.str());
  }
}

// Concatenates the per-block results in block order: entries sorted by query, then key.
void merge_blocks(const std::vector<std::vector<HeavyEntry>>& found,
                  const std::vector<std::vector<index_t>>& zeros, HeavyEntries& out) {
  for (std::size_t b = 0; b < found.size(); ++b) {
    out.entries.insert(out.entries.end(), found[b].begin(), found[b].end());
    out.zero_rows.insert(out.zero_rows.end(), zeros[b].begin(), zeros[b].end());
  }
}

HeavyEntries heavy_x2(ConstMatrix Q, ConstMatrix K, double eps, const LeverageOptions& lo) {
  check_inputs(Q, K, eps);
  const index_t m = Q.rows, d = K.cols;
  LeverageOptions exact = lo;
  exact.method = ScoreMethod::exact;
  exact.ridge = 0.0;
  const KeyGram g = key_gram(K, exact);
  const UniversalSet U = universal_set(
      lo.method == ScoreMethod::sketch ? leverage_scores(K, lo) : detail::scores_unchecked(K, g), eps);
  const index_t u = static_cast<index_t>(U.indices.size());

  HeavyEntries out;
  out.universal_size = u;
  out.rank = g.rank;
  out.normaliser = "exact (q^T M q)";

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
#pragma omp parallel if (blocks > 1)
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
  merge_blocks(found, zeros, out);
  return out;
}

}  // namespace

HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps) { return heavy_x2(Q, K, eps, {}); }

namespace {

// |x|^p with the common exponents multiplied out.
inline double power(double x, double p) {
  const double a = std::fabs(x);
  if (p == 1.0) return a;
  if (p == 2.0) return a * a;
  if (p == 3.0) return a * a * a;
  if (p == 4.0) return (a * a) * (a * a);
  return std::pow(a, p);
}

}  // namespace

HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps, const HeavyOptions& o) {
  std::ostringstream os;
  if (!(o.p > 0.0 && std::isfinite(o.p))) {
    os << "p: expected a finite exponent > 0, got " << o.p;
    detail::invalid(os.str());
  }
  if (o.normaliser == Normaliser::sampled) {
    if (o.samples < 0) detail::invalid("samples: expected an integer >= 0 (0: from gamma)");
    detail::require_open_unit(o.gamma, "gamma");
    detail::require_open_unit(o.delta, "delta");
  }
  if (o.p == 2.0 && o.normaliser == Normaliser::exact) return heavy_x2(Q, K, eps, o.leverage);
  check_inputs(Q, K, eps);
  const index_t m = Q.rows, n = K.rows, d = K.cols;
  // Upper bounds on the sensitivities: no ridge (ridge scores are smaller), and inflated by the
  // scores' own accuracy so that |q.k_l|^p <= t_l Z holds for sketched or rounded scores too.
  LeverageOptions lo = o.leverage;
  lo.ridge = 0.0;
  LeverageScores t = sensitivity_bounds(K, o.p, lo);
  for (double& x : t.scores) x = std::min(1.0, x * (1.0 + t.rel_error_bound));
  t.rel_error_bound = 0.0;
  const UniversalSet U = universal_set(t, eps);
  const index_t u = static_cast<index_t>(U.indices.size());

  HeavyEntries out;
  out.universal_size = u;
  out.rank = t.rank;
  out.p = o.p;

  // Sampling plan: keys drawn with probability t_l / T and their importance weights 1/(r pi_l).
  double total = 0.0;
  for (double x : t.scores) total += x;
  index_t r = 0;
  if (o.normaliser == Normaliser::sampled && total > 0.0) {
    const double logterm = std::log(2.0 * static_cast<double>(m) / o.delta);
    r = o.samples > 0 ? o.samples
                      : static_cast<index_t>(std::ceil(3.0 * total * logterm / (o.gamma * o.gamma)));
    if (r < n) {
      out.samples = r;
      out.gamma = std::sqrt(3.0 * total * logterm / static_cast<double>(r));
      if (out.gamma >= 1.0) {
        os << "samples: " << r << " keys give no (1 +- gamma) guarantee (gamma = " << out.gamma
           << " >= 1); draw at least " << static_cast<index_t>(std::ceil(3.0 * total * logterm))
           << " or leave samples at 0";
        detail::invalid(os.str());
      }
    } else {
      r = 0;  // the exact normaliser is cheaper
    }
  }
  out.normaliser = r > 0 ? "sampled" : "exact (all keys)";
  std::vector<float> ks;       // the sampled keys (r x d) or none
  std::vector<double> weight;  // 1 / (r pi_l) per sample
  if (r > 0) {
    std::vector<double> cdf(static_cast<std::size_t>(n));
    double acc = 0.0;
    for (index_t l = 0; l < n; ++l) cdf[l] = (acc += t.scores[l]);
    const detail::CounterRng rng(o.seed, 0x6865617679ull);  // stream: "heavy"
    ks.resize(static_cast<std::size_t>(r * d));
    weight.resize(static_cast<std::size_t>(r));
    for (index_t s = 0; s < r; ++s) {
      const double x = rng.uniform(static_cast<std::uint64_t>(s)) * acc;
      index_t l = static_cast<index_t>(std::upper_bound(cdf.begin(), cdf.end(), x) - cdf.begin());
      l = std::min(l, n - 1);
      while (t.scores[l] <= 0.0 && l > 0) --l;  // never land on a zero-probability key
      std::copy_n(K.row(l), d, ks.data() + s * d);
      weight[s] = acc / (static_cast<double>(r) * t.scores[l]);
    }
  }
  // The keys the normaliser runs over, in float64 so that Z_i is as accurate as the numerators.
  const index_t nkeys = r > 0 ? r : n;
  std::vector<double> keys64(static_cast<std::size_t>(nkeys * d));
  for (index_t l = 0; l < nkeys; ++l)
    for (index_t j = 0; j < d; ++j) keys64[l * d + j] = r > 0 ? ks[l * d + j] : K(l, j);
  const double report = r > 0 ? eps / (1.0 + out.gamma) : eps;

  std::vector<double> KU(static_cast<std::size_t>(u * d));
  for (index_t a = 0; a < u; ++a)
    for (index_t j = 0; j < d; ++j) KU[a * d + j] = K(U.indices[a], j);

  constexpr index_t kRows = 256, kTile = 512;
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<std::vector<HeavyEntry>> found(static_cast<std::size_t>(blocks));
  std::vector<std::vector<index_t>> zeros(static_cast<std::size_t>(blocks));
  detail::ExceptionTrap trap;
#pragma omp parallel if (blocks > 1)
  {
    std::vector<double> tile(static_cast<std::size_t>(kRows * kTile));
    std::vector<double> q, dots, z;
#pragma omp for schedule(dynamic, 1)
    for (index_t b = 0; b < blocks; ++b) {
      trap.run([&] {
        const index_t r0 = b * kRows, rows = std::min(kRows, m - r0);
        q.resize(static_cast<std::size_t>(rows * d));
        for (index_t i = 0; i < rows; ++i)
          for (index_t j = 0; j < d; ++j) q[i * d + j] = Q(r0 + i, j);
        z.assign(static_cast<std::size_t>(rows), 0.0);
        for (index_t c0 = 0; c0 < nkeys; c0 += kTile) {
          const index_t c = std::min(kTile, nkeys - c0);
          detail::dgemm_abt(rows, c, d, 1.0, q.data(), d, keys64.data() + c0 * d, d, 0.0, tile.data(), c);
          for (index_t i = 0; i < rows; ++i) {
            double s = 0.0;
            const double* row = tile.data() + i * c;
            if (r > 0)
              for (index_t a = 0; a < c; ++a) s += power(row[a], o.p) * weight[c0 + a];
            else
              for (index_t a = 0; a < c; ++a) s += power(row[a], o.p);
            z[i] += s;
          }
        }
        if (u > 0) {
          dots.resize(static_cast<std::size_t>(rows * u));
          detail::dgemm_abt(rows, u, d, 1.0, q.data(), d, KU.data(), d, 0.0, dots.data(), u);
        }
        for (index_t i = 0; i < rows; ++i) {
          if (!(z[i] > 0.0)) {
            zeros[b].push_back(r0 + i);
            continue;
          }
          for (index_t a = 0; a < u; ++a) {
            const double v = power(dots[i * u + a], o.p) / z[i];
            if (v >= report) found[b].push_back({r0 + i, U.indices[a], v});
          }
        }
      });
    }
  }
  trap.rethrow();
  merge_blocks(found, zeros, out);
  return out;
}

}  // namespace levattn
