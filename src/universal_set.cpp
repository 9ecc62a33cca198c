#include "levattn/universal_set.hpp"

#include <algorithm>
#include <numeric>
#include <sstream>

#include "detail/validate.hpp"

namespace levattn {

UniversalSet universal_set(const LeverageScores& s, double eps) {
  detail::require_eps(eps);
  UniversalSet u;
  u.n = static_cast<index_t>(s.scores.size());
  u.rank = s.rank;
  // Lowered by the accuracy of the scores so the set stays a superset of the exact U_eps.
  const double threshold = eps / (1.0 + s.rel_error_bound);
  for (index_t j = 0; j < u.n; ++j) {
    if (s.scores[j] >= threshold) {
      u.indices.push_back(j);
      u.scores.push_back(s.scores[j]);
    }
  }
  return u;
}

UniversalSet universal_set_top_k(const LeverageScores& s, index_t k) {
  if (k < 1) {
    std::ostringstream os;
    os << "top_k: expected an integer >= 1, got " << k;
    detail::invalid(os.str());
  }
  UniversalSet u;
  u.n = static_cast<index_t>(s.scores.size());
  u.rank = s.rank;
  if (u.n == 0) return u;
  std::vector<index_t> order(static_cast<std::size_t>(u.n));
  std::iota(order.begin(), order.end(), index_t{0});
  const index_t take = std::min(k, u.n);
  // Larger score first, ties to the lower index: a strict weak order, so the choice is unique.
  std::nth_element(order.begin(), order.begin() + take - 1, order.end(),
                   [&](index_t a, index_t b) {
                     return s.scores[a] != s.scores[b] ? s.scores[a] > s.scores[b] : a < b;
                   });
  order.resize(static_cast<std::size_t>(take));
  std::sort(order.begin(), order.end());
  u.indices = order;
  for (index_t j : order) u.scores.push_back(s.scores[j]);
  return u;
}

UniversalSet universal_set(ConstMatrix K, double eps, const LeverageOptions& options) {
  detail::require_eps(eps);
  return universal_set(leverage_scores(K, options), eps);
}

}  // namespace levattn
