#include <algorithm>
#include <cmath>
#include <unordered_set>
#include <utility>

#include "detail/blas.hpp"
#include "detail/rng.hpp"
#include "selectors.hpp"
#include "detail/validate.hpp"
#include "levattn/selection.hpp"

namespace levattn {

const std::vector<index_t>& Selection::shared_of(index_t h, index_t i) const {
  static const std::vector<index_t> none;
  if (shared_keys.empty()) return none;
  return shared_keys[static_cast<std::size_t>(h * segments() + (segment > 0 ? i / segment : 0))];
}

void Selection::mask_row(index_t h, index_t i, char* mask) const {
  std::fill_n(mask, n, all_keys ? 1 : 0);
  for (index_t j : shared_of(h, i)) mask[j] = 1;
  if (window >= 0)
    for (index_t j = std::max<index_t>(0, i - window); j <= std::min(n - 1, i + window); ++j) mask[j] = 1;
  for (index_t a = 0; a < top_k; ++a) {
    const index_t j = query_keys[static_cast<std::size_t>((h * m + i) * top_k + a)];
    if (j >= 0) mask[j] = 1;
  }
  if (causal) std::fill(mask + std::min(n, i + 1), mask + n, 0);
  if (!key_mask.empty())
    for (index_t j = 0; j < n; ++j) mask[j] = mask[j] && key_open(h, j);
}

namespace {

// The first segment whose queries can attend key j (0 unless causal with segments).
index_t first_segment(const Selection& s, index_t j) { return s.causal && s.segment > 0 ? j / s.segment : 0; }

}  // namespace

std::vector<index_t> key_segments(const Selection& s) {
  const index_t pairs = s.pairs(), segs = s.segments();
  std::vector<index_t> last(static_cast<std::size_t>(checked_elements({pairs, s.n}, "key segments")), -1);
  if (s.shared_keys.empty()) return last;
  std::vector<index_t> count(static_cast<std::size_t>(s.n));
  for (index_t h = 0; h < pairs; ++h) {
    index_t* lh = last.data() + h * s.n;
    std::fill(count.begin(), count.end(), 0);
    for (index_t g = 0; g < segs; ++g)
      for (index_t j : s.shared_keys[static_cast<std::size_t>(h * segs + g)]) {
        if (g < first_segment(s, j)) continue;  // a later key: causally invisible to this segment
        lh[j] = std::max(lh[j], g);
        ++count[j];
      }
    for (index_t j = 0; j < s.n; ++j)
      if (lh[j] >= 0 && count[j] != lh[j] - first_segment(s, j) + 1)
        detail::fail(ErrorKind::internal, "key_segments", "the shared sets of pair ", h, " do not hold key ", j,
                     " over one run of segments");
  }
  return last;
}

Selection selection_from_arrays(const Selection& layout, const index_t* key_segments, const index_t* query_keys) {
  Selection s = layout;
  const index_t pairs = s.pairs(), segs = s.segments();
  s.shared_keys.assign(static_cast<std::size_t>(checked_elements({pairs, segs}, "shared sets")), {});
  bool any = false;
  for (index_t h = 0; h < pairs; ++h)
    for (index_t j = 0; j < s.n; ++j) {
      const index_t g1 = key_segments[h * s.n + j];
      if (g1 < 0) {
        LEVATTN_REQUIRE(g1 == -1, "key_segments", "expected -1 or a segment index, got ", g1);
        continue;
      }
      LEVATTN_REQUIRE(g1 < segs && g1 >= first_segment(s, j), "key_segments", "key ", j, " of pair ", h,
                      " names segment ", g1, "; expected ", first_segment(s, j), " .. ", segs - 1, " or -1");
      for (index_t g = first_segment(s, j); g <= g1; ++g) s.shared_keys[static_cast<std::size_t>(h * segs + g)].push_back(j);
      any = true;
    }
  if (!any) s.shared_keys.clear();  // as select_keys leaves a selection without shared keys
  if (s.top_k > 0) s.query_keys.assign(query_keys, query_keys + pairs * s.m * s.top_k);
  return s;
}

std::vector<index_t> Selection::keys_per_query() const {
  std::vector<index_t> out(static_cast<std::size_t>(pairs() * m));
  std::vector<index_t> open(static_cast<std::size_t>(n + 1));  // open[j]: unmasked keys before j
  for (index_t h = 0; h < pairs(); ++h) {
    for (index_t j = 0; j < n; ++j) open[j + 1] = open[j] + (key_open(h, j) ? 1 : 0);
    for (index_t i = 0; i < m; ++i) {
      const std::vector<index_t>& s = shared_of(h, i);  // holds no masked key
      const auto below = [&](index_t j) { return static_cast<index_t>(std::upper_bound(s.begin(), s.end(), j) - s.begin()); };
      index_t c = all_keys ? open[causal ? std::min(n, i + 1) : n] : causal ? below(i) : static_cast<index_t>(s.size());
      if (window >= 0) {
        const index_t lo = std::max<index_t>(0, i - window), hi = std::min(n - 1, causal ? i : i + window);
        if (hi >= lo) c += open[hi + 1] - open[lo] - (below(hi) - below(lo - 1));  // lo > hi: a query past every key
      }
      for (index_t a = 0; a < top_k; ++a) c += query_keys[static_cast<std::size_t>((h * m + i) * top_k + a)] >= 0 ? 1 : 0;
      out[static_cast<std::size_t>(h * m + i)] = c;
    }
  }
  return out;
}

}  // namespace levattn

namespace levattn::detail {

void mark_members(const std::vector<index_t>& sorted, index_t j0, index_t c, char* flags) {
  std::fill_n(flags, c, 0);
  for (auto it = std::lower_bound(sorted.begin(), sorted.end(), j0); it != sorted.end() && *it < j0 + c; ++it)
    flags[*it - j0] = 1;
}

std::vector<index_t> random_keys(index_t n, index_t k, const CounterRng& rng) {
  std::vector<index_t> out;
  if (k >= n) {
    out.resize(static_cast<std::size_t>(n));
    for (index_t j = 0; j < n; ++j) out[j] = j;
    return out;
  }
  std::unordered_set<index_t> chosen;
  chosen.reserve(static_cast<std::size_t>(2 * k));
  std::uint64_t draw = 0;
  for (index_t j = n - k; j < n; ++j) {
    const auto t = static_cast<index_t>(rng.below(draw++, static_cast<std::uint64_t>(j + 1)));
    chosen.insert(chosen.count(t) ? j : t);
  }
  out.assign(chosen.begin(), chosen.end());
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<index_t> open_keys(index_t n, const std::uint8_t* open) {
  std::vector<index_t> keys;
  keys.reserve(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j)
    if (!open || open[j]) keys.push_back(j);
  return keys;
}

void top_keys(const kernels::KernelParams& params, ConstMatrix Q, ConstMatrix K, index_t k,
              index_t i0, index_t i1, index_t* out, std::vector<float>& tile, bool causal, const std::uint8_t* open) {
  const index_t rows = i1 - i0, n = causal ? std::min(K.rows, i1) : K.rows, d = K.cols;
  const index_t width = std::min(kernels::kKeyTile, n);
  tile.resize(static_cast<std::size_t>(rows * width));
  std::vector<BestKeys> best(static_cast<std::size_t>(rows), BestKeys(k));
  for (index_t c0 = 0; c0 < n; c0 += width) {
    const index_t c = std::min(width, n - c0);
    gemm_abt(rows, c, d, params.scale, Q.row(i0), Q.ld, K.row(c0), K.ld, 0.0f, tile.data(), c);
    for (index_t r = 0; r < rows; ++r) {
      const float* s = tile.data() + r * c;
      const index_t seen = causal ? std::min(c, i0 + r + 1 - c0) : c;  // causal: keys j <= i only
      for (index_t j = 0; j < seen; ++j)
        if (!open || open[c0 + j]) best[r].push(params.kernel == Kernel::softmax ? s[j] : std::fabs(s[j]), c0 + j);
    }
  }
  for (index_t r = 0; r < rows; ++r) best[r].write(out + r * k);
}

}  // namespace levattn::detail
