#include "levattn/universal_set.hpp"

#include <algorithm>
#include <functional>
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
  // The k-th largest score t (selection on a plain copy of the scores), then in index order
  // every key above t and as many keys equal to t as still fit: larger score first, ties to the
  // lower index, so the choice is unique.
  const index_t take = std::min(k, u.n);
  std::vector<double> copy = s.scores;
  std::nth_element(copy.begin(), copy.begin() + (take - 1), copy.end(), std::greater<>());
  const double t = copy[take - 1];
  index_t above = 0;
  for (double x : s.scores) above += x > t ? 1 : 0;
  index_t ties = take - above;
  u.indices.reserve(static_cast<std::size_t>(take));
  u.scores.reserve(static_cast<std::size_t>(take));
  for (index_t j = 0; j < u.n; ++j) {
    const double x = s.scores[j];
    if (x > t || (x == t && ties-- > 0)) {
      u.indices.push_back(j);
      u.scores.push_back(x);
    }
  }
  return u;
}

UniversalSet universal_set(ConstMatrix K, double eps, const LeverageOptions& options) {
  detail::require_eps(eps);
  return universal_set(leverage_scores(K, options), eps);
}

}  // namespace levattn
