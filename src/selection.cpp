#include <algorithm>
#include <cmath>
#include <unordered_set>
#include <utility>

#include "detail/blas.hpp"
#include "detail/rng.hpp"
#include "detail/selection.hpp"

namespace levattn::detail {

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

void top_keys(const kernels::KernelParams& params, ConstMatrix Q, ConstMatrix K, index_t k,
              index_t i0, index_t i1, index_t* out, std::vector<float>& tile) {
  const index_t rows = i1 - i0, n = K.rows, d = K.cols;
  const index_t width = std::min(kernels::kKeyTile, n);
  tile.resize(static_cast<std::size_t>(rows * width));
  std::vector<BestKeys> best(static_cast<std::size_t>(rows), BestKeys(k));
  for (index_t c0 = 0; c0 < n; c0 += width) {
    const index_t c = std::min(width, n - c0);
    gemm_abt(rows, c, d, params.scale, Q.row(i0), Q.ld, K.row(c0), K.ld, 0.0f, tile.data(), c);
    for (index_t r = 0; r < rows; ++r) {
      const float* s = tile.data() + r * c;
      for (index_t j = 0; j < c; ++j) best[r].push(params.kernel == Kernel::softmax ? s[j] : std::fabs(s[j]), c0 + j);
    }
  }
  for (index_t r = 0; r < rows; ++r) best[r].write(out + r * k);
}

}  // namespace levattn::detail
