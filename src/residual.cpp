// The residual part of a selection (math.md 1.8): per block of queries, keys drawn uniformly
// without replacement from the keys its selection leaves out, weighted so that they estimate
// each query's dropped normaliser and numerator without bias.
#include <algorithm>
#include <cmath>

#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "detail/validate.hpp"
#include "levattn/selection.hpp"

namespace levattn {
namespace {

// Per-thread state, so that testing a draw is O(1) and nothing is cleared between blocks:
// drawn[j] == block marks key j as drawn for `block` (h residual_blocks() + b); in_set[j] == set
// marks key j as a member of shared set `set` (marked once per set a thread meets).
struct SampleWork {
  std::vector<index_t> drawn, in_set, rest;
  index_t marked = -1;  // the shared set whose keys in_set marks
  explicit SampleWork(index_t n) : drawn(static_cast<std::size_t>(n), -1), in_set(drawn) {}
};

// Block b of pair h (queries i0 .. i1 - 1, one segment's): up to r keys of its rest into out,
// ascending, and their weight.
void sample_block(const Selection& sel, const index_t* open_before, SampleWork& w, index_t h, index_t b, index_t i0,
                  index_t i1, index_t r, std::uint64_t seed, index_t* out, double& weight) {
  const index_t set = h * sel.segments() + (sel.segment > 0 ? i0 / sel.segment : 0);
  const index_t block = h * sel.residual_blocks() + b, limit = sel.causal ? std::min(sel.n, i1) : sel.n;
  const std::vector<index_t>& shared = sel.shared_of(h, i0);
  if (!shared.empty() && w.marked != set) {
    for (index_t j : shared) w.in_set[j] = set;
    w.marked = set;
  }
  // The open keys below the limit (open_before: per batch, n + 1 prefix counts) less the shared
  // ones (all open).
  const index_t rest = open_before[h / sel.heads * (sel.n + 1) + limit] -
                       static_cast<index_t>(std::lower_bound(shared.begin(), shared.end(), limit) - shared.begin());
  if (rest <= 0) return;
  // Whether the block may draw key j: open, not shared, not drawn yet.
  const auto in_rest = [&](index_t j) { return w.drawn[j] != block && w.in_set[j] != set && sel.key_open(h, j); };
  const detail::CounterRng rng(seed, detail::Purpose::residual_sample, static_cast<std::uint64_t>(block));
  detail::Draws draws(rng);
  const index_t take = std::min(r, rest);
  if (4 * (rest - take) >= limit) {
    // Most keys below the limit are in the rest: draw among all of them and reject the others
    // (each draw accepted with probability >= 1/4). The accepted keys are a uniform sample
    // without replacement.
    for (index_t got = 0; got < take;) {
      const auto j = static_cast<index_t>(draws.below(static_cast<std::uint32_t>(limit)));
      if (!in_rest(j)) continue;
      w.drawn[j] = block;
      out[got++] = j;
    }
  } else {
    // A small rest: enumerate it, then a partial Fisher-Yates shuffle of its first `take` places.
    w.rest.clear();
    for (index_t j = 0; j < limit; ++j)
      if (in_rest(j)) w.rest.push_back(j);
    if (static_cast<index_t>(w.rest.size()) != rest)
      detail::fail(ErrorKind::internal, "sample_residual", "block ", b, " of pair ", h, ": rest of ", w.rest.size(),
                   " keys, counted ", rest);
    for (index_t a = 0; a < take && take < rest; ++a)
      std::swap(w.rest[a], w.rest[a + static_cast<index_t>(draws.below(static_cast<std::uint32_t>(rest - a)))]);
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
  LEVATTN_REQUIRE(sel.n >= 1 && sel.n < (index_t{1} << 32) && sel.m >= 0 && sel.pairs() >= 0, "residual",
                  "expected a selection over 1 to 2^32 - 1 keys, got ", sel.n);
  const index_t pairs = sel.pairs(), blocks = sel.residual_blocks(), per_segment = sel.blocks_per_segment();
  const index_t len = sel.segment > 0 ? sel.segment : sel.m, slots = std::min(r, sel.n);
  std::vector<index_t> keys(static_cast<std::size_t>(checked_elements({pairs, blocks, slots}, "residual keys")), -1);
  std::vector<double> weight(static_cast<std::size_t>(pairs * blocks), 1.0);
  std::vector<index_t> open_before(static_cast<std::size_t>(sel.batch * (sel.n + 1)), 0);
  for (index_t b = 0; b < sel.batch; ++b)
    for (index_t j = 0; j < sel.n; ++j)
      open_before[b * (sel.n + 1) + j + 1] = open_before[b * (sel.n + 1) + j] + (sel.key_open(b * sel.heads, j) ? 1 : 0);
  detail::parallel_tasks(pairs * blocks, 50.0 * static_cast<double>(pairs * blocks * slots) + static_cast<double>(pairs * sel.n),
                         [&] { return SampleWork(sel.n); }, [&](index_t t, SampleWork& w) {
                           const index_t h = t / blocks, b = t % blocks;
                           const index_t i0 = b / per_segment * len + b % per_segment * kResidualBlock;
                           const index_t i1 = std::min({sel.m, i0 + kResidualBlock, (b / per_segment + 1) * len});
                           if (i0 < i1)
                             sample_block(sel, open_before.data(), w, h, b, i0, i1, slots, seed, keys.data() + t * slots,
                                          weight[t]);
                         });
  sel.residual = slots;
  sel.residual_keys = std::move(keys);
  sel.residual_weight = std::move(weight);
}

}  // namespace levattn
