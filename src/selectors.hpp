// selectors.hpp: the per-head key selections that are not leverage scores.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "detail/rng.hpp"
#include "detail/kth.hpp"
#include "kernels/elementwise.hpp"
#include "kernels/online_attention.hpp"

namespace levattn::detail {

/// k distinct keys of [0, n) uniformly at random (Floyd's algorithm), ascending; a pure function
/// of (n, k, rng's stream). k >= n returns every key.
std::vector<index_t> random_keys(index_t n, index_t k, const CounterRng& rng);

/// The keys j of [0, n) with open[j] != 0, ascending (every key when open is null).
std::vector<index_t> open_keys(index_t n, const std::uint8_t* open);

/// The k strongest (value, key) pairs of a row whose keys arrive in ascending order: larger values
/// first, ties to the lower key. A pair enters only above threshold(), the k-th value once k
/// pairs are held (a pair equal to it comes later, so loses the tie). Pairs are appended in key
/// order to a buffer that is cut back to its k strongest when it reaches max(2k, k + 64) pairs:
/// kth_largest's vectorised counts and one stable pass, O(1) amortised per pair. Scanning n keys
/// in random order adds about 2 k ln(n / k) of them.
class StrongestKeys {
 public:
  /// Empty, keeping the k strongest, its buffer in values and keys [0 .. room(k, keys to be added)).
  StrongestKeys(index_t k, float* values, index_t* keys, const kernels::RowOps& ops, std::vector<float>& scratch)
      : k_(k), cap_(std::max(2 * k, k + 64)), values_(values), keys_(keys), ops_(&ops), scratch_(&scratch) {}
  static index_t room(index_t k, index_t keys) { return std::min(std::max(2 * k, k + 64), keys); }
  /// Pairs at or below it need not be added, they cannot be among the k strongest: the k-th
  /// value once k pairs are held, else below the last raise()'s bound or -inf (+inf for k = 0).
  float threshold() const { return k_ == 0 ? std::numeric_limits<float>::infinity() : threshold_; }
  /// Lets threshold() start just below bound, a value at or below the row's k-th largest (the
  /// k-th largest of some of its entries).
  void raise(float bound) {
    threshold_ = std::max(threshold_, std::nextafter(bound, -std::numeric_limits<float>::infinity()));
  }
  /// Adds (value, key), value finite, key above every key added before.
  void add(float value, index_t key) {
    values_[size_] = value, keys_[size_] = key;
    if (++size_ == cap_) cut();
  }
  /// The k strongest keys, ascending, into out[0 .. k), -1 in the slots beyond the pairs added;
  /// empties it.
  void write(index_t* out);

 private:
  void cut();
  index_t k_, cap_, size_ = 0;
  float* values_;
  index_t* keys_;
  const kernels::RowOps* ops_;
  std::vector<float>* scratch_;
  float threshold_ = -std::numeric_limits<float>::infinity();
};

/// A top_keys task's buffers, reused across its calls.
struct TopKeysWork {
  std::vector<float> tile;                          // rows x kKeyTile logits
  std::vector<index_t> above;                       // one row's entries above its threshold
  std::vector<float> values, scratch;               // rows x room: the rows' StrongestKeys
  std::vector<index_t> keys;
};

/// For queries i0 .. i1-1 of Q, the k keys of K with largest f(scale q.k) (softmax: logit,
/// power: |logit|), ties to the lower index, each row ascending, into out ((i1 - i0) x k).
/// Causal: query i ranks keys 0 .. i only (-1 in the slots beyond i + 1 keys). Scans all keys
/// with GEMM tiles, each row's logits filtered against its k-th best so far (StrongestKeys):
/// O((i1 - i0) n d) time, O(64 kKeyTile + (i1 - i0) k) workspace.
/// open (n bytes, nullable): only keys with open[j] != 0 are ranked (-1 in the slots beyond them).
/// Throws Error(invalid_argument) if a logit overflows float32 (params.check_overflow).
void top_keys(const kernels::KernelParams& params, ConstMatrix Q, ConstMatrix K, index_t k,
              index_t i0, index_t i1, index_t* out, TopKeysWork& work, bool causal = false,
              const std::uint8_t* open = nullptr);

/// flags[a] = 1 if key j0 + a is in `sorted` (ascending), else 0, for a in [0, c): O(c + log).
void mark_members(const std::vector<index_t>& sorted, index_t j0, index_t c, char* flags);

}  // namespace levattn::detail
