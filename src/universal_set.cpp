#include "levattn/universal_set.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "detail/kth.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/lewis_weights.hpp"

namespace levattn {

namespace {

UniversalSet empty_set(const LeverageScores& s) {
  UniversalSet u;
  u.n = static_cast<index_t>(s.scores.size());
  u.rank = s.rank;
  u.score_rel_error_bound = s.rel_error_bound;
  u.method = s.method;
  u.sketch_size = s.sketch_size;
  u.failure_probability = s.failure_probability;
  return u;
}

}  // namespace

UniversalSet universal_set(const LeverageScores& s, double eps) {
  detail::require_eps(eps);
  UniversalSet u = empty_set(s);
  // Lowered by the accuracy of the scores so the set stays a superset of the exact U_eps.
  const double threshold = eps / (1.0 + s.rel_error_bound);
  double sum = s.sum_bound;
  if (!(sum > 0.0))
    for (double x : s.scores) sum += x;
  const double g = 1.0 + s.rel_error_bound;
  u.size_bound = std::floor(std::min(static_cast<double>(u.n), sum * g * g / eps));
  for (index_t j = 0; j < u.n; ++j) {
    if (s.scores[j] >= threshold) {
      u.indices.push_back(j);
      u.scores.push_back(s.scores[j]);
    }
  }
  return u;
}

UniversalSet universal_set_top_k(const LeverageScores& s, index_t k) {
  LEVATTN_REQUIRE(k >= 1, "top_k", "expected an integer >= 1, got ", k);
  UniversalSet u = empty_set(s);
  if (u.n == 0) return u;
  // The k-th largest score t, then in index order every key above t and as many keys equal to t
  // as still fit: larger score first, ties to the lower index, so the choice is unique. Rounding
  // to float is monotone, so the k-th largest of the rounded scores (vectorised counting passes)
  // brackets t: only the scores that round to it are ordered in double.
  const index_t take = std::min(k, u.n);
  const std::vector<float> rounded(s.scores.begin(), s.scores.end());
  const kernels::RowOps& ops = kernels::active_row_ops();
  std::vector<float> scratch;
  const detail::Kth near = detail::kth_largest(ops, rounded.data(), u.n, take, ops.row_max(rounded.data(), u.n), scratch);
  std::vector<double> bracket;
  for (index_t j = 0; j < u.n; ++j)
    if (rounded[j] == near.value) bracket.push_back(s.scores[j]);
  const auto rank = static_cast<std::ptrdiff_t>(static_cast<std::size_t>(take - 1) - near.above);
  std::nth_element(bracket.begin(), bracket.begin() + rank, bracket.end(), std::greater<>());
  const double t = bracket[static_cast<std::size_t>(rank)];
  index_t above = 0, equal = 0;
  for (double x : s.scores) above += x > t, equal += x == t;
  index_t ties = take - above;
  u.ties_left_out = equal - ties;
  u.size_bound = static_cast<double>(take);
  // Written in place without branches on the scores (which keys pass is data, not a pattern the
  // branch predictor learns): each key is stored, and the end moves on only if it is kept.
  u.indices.resize(static_cast<std::size_t>(take) + 1);
  u.scores.resize(u.indices.size());
  index_t kept = 0;
  for (index_t j = 0; j < u.n && kept < take; ++j) {
    const double x = s.scores[j];
    const bool tie = x == t && ties > 0;
    u.indices[static_cast<std::size_t>(kept)] = j, u.scores[static_cast<std::size_t>(kept)] = x;
    ties -= tie;
    kept += (x > t) | tie;
  }
  u.indices.resize(static_cast<std::size_t>(take)), u.scores.resize(static_cast<std::size_t>(take));
  return u;
}

UniversalSet universal_set(ConstMatrix K, double eps, const LeverageOptions& options) {
  detail::require_eps(eps);
  return universal_set(leverage_scores(K, options), eps);
}

std::vector<UniversalSet> universal_sets(const Tensor4Ref& K, const UniversalOptions& o) {
  LEVATTN_REQUIRE((o.top_k != 0) != (o.eps != 0.0), "universal set",
                  "give exactly one of eps in (0, 1] or top_k >= 1");
  if (o.eps != 0.0) detail::require_eps(o.eps);
  LEVATTN_REQUIRE(o.top_k >= 0, "top_k", "expected an integer >= 1, got ", o.top_k);
  LEVATTN_REQUIRE(K.batch >= 1 && K.heads >= 1, "keys", "expected batch >= 1 and heads >= 1, got (", K.batch, ", ",
                  K.heads, ")");
  const index_t pairs = K.batch * K.heads;
  std::vector<UniversalSet> out(static_cast<std::size_t>(pairs));
  const auto select = [&](index_t h) {
    const LeverageScores s = sensitivity_bounds(K.slice(h / K.heads, h % K.heads), o.p, o.leverage);
    out[h] = o.top_k > 0 ? universal_set_top_k(s, o.top_k) : universal_set(s, o.eps);
  };
  if (pairs == 1) {
    select(0);  // one matrix: its own passes use the team
    return out;
  }
  const double flops = 2.0 * static_cast<double>(pairs) * static_cast<double>(K.rows) *
                       static_cast<double>(K.cols * K.cols);
  detail::parallel_tasks(pairs, flops, [] { return 0; }, [&](index_t h, int&) { select(h); });
  return out;
}

}  // namespace levattn
