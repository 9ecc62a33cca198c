// The residual part of a selection (math.md 1.8): per query, keys drawn uniformly without
// replacement from the keys its selection drops, weighted so that they estimate the dropped
// normaliser and numerator without bias.
#include <algorithm>
#include <cmath>

#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "detail/validate.hpp"
#include "levattn/selection.hpp"

namespace levattn {
namespace {

// Query rows per task: a function of the sizes alone, so the draws never depend on the threads
// (they would not anyway: each query has its own stream).
constexpr index_t kRowsPerTask = 256;

// Per-thread state: stamp[j] == row marks key j as attended by query `row` already (its own keys,
// then its draws), so that a draw is tested in O(log |shared|) without clearing between queries.
struct SampleWork {
  std::vector<index_t> stamp, rest;
  explicit SampleWork(index_t n) : stamp(static_cast<std::size_t>(n), -1) {}
};

// Whether query i of pair h (row = h m + i) may draw key j: open, not in its shared set, band or
// own keys, and not drawn yet (stamp).
bool in_rest(const Selection& sel, const SampleWork& w, index_t h, index_t i, index_t row, index_t j) {
  if (w.stamp[j] == row || !sel.key_open(h, j)) return false;
  if (sel.window >= 0 && std::abs(i - j) <= sel.window) return false;
  const std::vector<index_t>& shared = sel.shared_of(h, i);
  return !std::binary_search(shared.begin(), shared.end(), j);
}

// Query i of pair h: up to r keys of its rest (|rest| of them below `limit`) into out, ascending,
// and its weight.
void sample_row(const Selection& sel, SampleWork& w, index_t h, index_t i, index_t limit, index_t rest, index_t r,
                std::uint64_t seed, index_t* out, double& weight) {
  const index_t row = h * sel.m + i;
  for (index_t a = 0; a < sel.top_k; ++a) {
    const index_t j = sel.query_keys[static_cast<std::size_t>(row * sel.top_k + a)];
    if (j >= 0) w.stamp[j] = row;
  }
  const detail::CounterRng rng(seed, detail::Purpose::residual_sample, static_cast<std::uint64_t>(row));
  std::uint64_t draw = 0;
  const index_t take = std::min(r, rest);
  if (4 * (rest - take) >= limit) {
    // Most keys below the limit are in the rest: draw among all of them and reject the others
    // (each draw accepted with probability >= 1/4). The accepted keys are a uniform sample
    // without replacement.
    for (index_t got = 0; got < take;) {
      const auto j = static_cast<index_t>(rng.below(draw++, static_cast<std::uint64_t>(limit)));
      if (!in_rest(sel, w, h, i, row, j)) continue;
      w.stamp[j] = row;
      out[got++] = j;
    }
  } else {
    // A small rest: enumerate it, then a partial Fisher-Yates shuffle of its first `take` places.
    w.rest.clear();
    for (index_t j = 0; j < limit; ++j)
      if (in_rest(sel, w, h, i, row, j)) w.rest.push_back(j);
    if (static_cast<index_t>(w.rest.size()) != rest)
      detail::fail(ErrorKind::internal, "sample_residual", "query ", i, " of pair ", h, ": rest of ", w.rest.size(),
                   " keys, counted ", rest);
    for (index_t a = 0; a < take && take < rest; ++a) {
      const auto b = a + static_cast<index_t>(rng.below(draw++, static_cast<std::uint64_t>(rest - a)));
      std::swap(w.rest[a], w.rest[b]);
    }
    std::copy_n(w.rest.begin(), take, out);
  }
  std::sort(out, out + take);
  weight = static_cast<double>(rest) / static_cast<double>(take);
}

}  // namespace

void sample_residual(Selection& sel, index_t r, std::uint64_t seed) {
  LEVATTN_REQUIRE(r >= 1, "residual", "expected a number of sampled keys >= 1, got ", r);
  LEVATTN_REQUIRE(!sel.all_keys, "residual", "the selection attends every key and leaves none to sample");
  LEVATTN_REQUIRE(sel.residual == 0 && sel.residual_keys.empty(), "residual", "the selection has a residual part already");
  LEVATTN_REQUIRE(sel.n >= 1 && sel.m >= 0 && sel.pairs() >= 0, "residual", "expected a selection over n >= 1 keys");
  const index_t pairs = sel.pairs(), n = sel.n, m = sel.m;
  const std::vector<index_t> kept = sel.keys_per_query();
  std::vector<index_t> open(static_cast<std::size_t>(sel.batch * (n + 1)), 0);  // unmasked keys before j, per batch
  for (index_t b = 0; b < sel.batch; ++b)
    for (index_t j = 0; j < n; ++j) open[b * (n + 1) + j + 1] = open[b * (n + 1) + j] + (sel.key_open(b * sel.heads, j) ? 1 : 0);
  const index_t slots = std::min(r, n);
  std::vector<index_t> keys(static_cast<std::size_t>(checked_elements({pairs, m, slots}, "residual keys")), -1);
  std::vector<double> weight(static_cast<std::size_t>(pairs * m), 1.0);
  const index_t blocks = (m + kRowsPerTask - 1) / kRowsPerTask;
  detail::parallel_tasks(pairs * blocks, 50.0 * static_cast<double>(pairs * m * slots), [&] { return SampleWork(n); },
                         [&](index_t t, SampleWork& w) {
                           const index_t h = t / blocks, i0 = (t % blocks) * kRowsPerTask;
                           for (index_t i = i0; i < std::min(m, i0 + kRowsPerTask); ++i) {
                             const index_t row = h * m + i, limit = sel.causal ? std::min(n, i + 1) : n;
                             const index_t rest = open[h / sel.heads * (n + 1) + limit] - kept[row];
                             if (rest > 0)
                               sample_row(sel, w, h, i, limit, rest, slots, seed, keys.data() + row * slots, weight[row]);
                           }
                         });
  sel.residual = slots;
  sel.residual_keys = std::move(keys);
  sel.residual_weight = std::move(weight);
}

}  // namespace levattn
