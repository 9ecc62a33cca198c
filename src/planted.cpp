#include "levattn/planted.hpp"

#include <cmath>

#include "detail/rng.hpp"
#include "selectors.hpp"
#include "detail/validate.hpp"

namespace levattn {
namespace {

}  // namespace

PlantedInstance planted(const PlantedOptions& o) {
  LEVATTN_REQUIRE(o.n >= 1 && o.d >= 1 && o.m >= 0, "planted", "expected n >= 1, d >= 1, m >= 0, got n = ", o.n,
                  ", d = ", o.d, ", m = ", o.m);
  LEVATTN_REQUIRE(o.relevant >= 1 && o.relevant <= std::min(o.n, o.d), "relevant",
                  "expected 1 <= relevant <= min(n, d) = ", std::min(o.n, o.d), ", got ", o.relevant);
  LEVATTN_REQUIRE((o.noise > 0 && std::isfinite(o.noise)) && (o.signal >= 0 && std::isfinite(o.signal)) &&
                      (o.query_norm >= 0 && std::isfinite(o.query_norm)),
                  "planted", "expected noise > 0 and signal, query_norm >= 0 (0: default), finite");
  const index_t n = o.n, d = o.d, m = o.m > 0 ? o.m : o.n, R = o.relevant;
  checked_allocation({2 * n + m, d}, sizeof(float), "planted: Q, K and V");
  const double nd = static_cast<double>(n), dd = static_cast<double>(d);
  const double signal = o.signal > 0 ? o.signal : 2.0 * o.noise * std::sqrt(nd / dd);
  const double qnorm = o.query_norm > 0 ? o.query_norm : (std::log(nd) + 6.0) * std::sqrt(dd) / signal;

  PlantedInstance inst;
  inst.K = DenseMatrix<float>(n, d);
  inst.Q = DenseMatrix<float>(m, d);
  inst.V = DenseMatrix<float>(n, d);
  const std::uint64_t seed = o.seed;
  using detail::Purpose;
  const detail::CounterRng noise_rng(seed, Purpose::planted_noise),
      dir_rng(seed, Purpose::planted_directions), q_rng(seed, Purpose::planted_queries),
      v_rng(seed, Purpose::planted_values), t_rng(seed, Purpose::planted_targets);

  // Orthonormal directions: Gram-Schmidt (twice, for orthogonality to rounding) of Gaussians.
  std::vector<double> U(static_cast<std::size_t>(R * d));
  for (index_t r = 0; r < R; ++r) {
    double* u = U.data() + r * d;
    for (index_t j = 0; j < d; ++j) u[j] = dir_rng.normal(static_cast<std::uint64_t>(r * d + j));
    for (int pass = 0; pass < 2; ++pass)
      for (index_t s = 0; s < r; ++s) {
        const double* w = U.data() + s * d;
        double dot = 0;
        for (index_t j = 0; j < d; ++j) dot += u[j] * w[j];
        for (index_t j = 0; j < d; ++j) u[j] -= dot * w[j];
      }
    double nrm = 0;
    for (index_t j = 0; j < d; ++j) nrm += u[j] * u[j];
    nrm = std::sqrt(nrm);
    for (index_t j = 0; j < d; ++j) u[j] /= nrm;
  }

  const double key_sd = o.noise / std::sqrt(dd);
#pragma omp parallel for schedule(static) if (n * d > (1 << 16))
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j) {
      const auto c = static_cast<std::uint64_t>(i * d + j);
      inst.K(i, j) = static_cast<float>(key_sd * noise_rng.normal(c));
      inst.V(i, j) = static_cast<float>(v_rng.normal(c));
    }
  inst.relevant = detail::random_keys(n, R, detail::CounterRng(seed, Purpose::planted_positions));
  for (index_t r = 0; r < R; ++r)
    for (index_t j = 0; j < d; ++j)
      inst.K(inst.relevant[r], j) = static_cast<float>(signal * U[r * d + j]);

  inst.query_target.resize(static_cast<std::size_t>(m));
#pragma omp parallel for schedule(static) if (m * d > (1 << 16))
  for (index_t i = 0; i < m; ++i) {
    const auto r = static_cast<index_t>(t_rng.below(static_cast<std::uint64_t>(i), static_cast<std::uint64_t>(R)));
    inst.query_target[i] = inst.relevant[r];
    for (index_t j = 0; j < d; ++j)
      inst.Q(i, j) = static_cast<float>(qnorm * U[r * d + j] +
                                        key_sd * q_rng.normal(static_cast<std::uint64_t>(i * d + j)));
  }
  return inst;
}

}  // namespace levattn
