// selectors.hpp: the per-head key selections that are not leverage scores.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "detail/rng.hpp"
#include "kernels/online_attention.hpp"

namespace levattn::detail {

/// k distinct keys of [0, n) uniformly at random (Floyd's algorithm), ascending; a pure function
/// of (n, k, rng's stream). k >= n returns every key.
std::vector<index_t> random_keys(index_t n, index_t k, const CounterRng& rng);

/// The keys j of [0, n) with open[j] != 0, ascending (every key when open is null).
std::vector<index_t> open_keys(index_t n, const std::uint8_t* open);

/// The k best (value, key) pairs pushed so far: larger values first, ties to the lower key.
class BestKeys {
 public:
  explicit BestKeys(index_t k = 0) : k_(k) { heap_.reserve(static_cast<std::size_t>(k)); }
  void push(float value, index_t key) {
    const Item item{value, -key};
    if (static_cast<index_t>(heap_.size()) < k_) {
      heap_.push_back(item);
      std::push_heap(heap_.begin(), heap_.end(), stronger);
    } else if (k_ > 0 && stronger(item, heap_.front())) {
      std::pop_heap(heap_.begin(), heap_.end(), stronger);
      heap_.back() = item;
      std::push_heap(heap_.begin(), heap_.end(), stronger);
    }
  }
  /// The keys best first into out[0 .. k), -1 in the slots beyond the pairs pushed; empties it.
  void write(index_t* out) {
    std::sort_heap(heap_.begin(), heap_.end(), stronger);  // strongest first
    for (index_t a = 0; a < k_; ++a) out[a] = a < static_cast<index_t>(heap_.size()) ? -heap_[a].second : -1;
    heap_.clear();
  }

 private:
  using Item = std::pair<float, index_t>;  // (value, -key): the root is the weakest kept
  struct Stronger {  // a function object, so that the heap operations inline it
    bool operator()(const Item& a, const Item& b) const {
      return a.first != b.first ? a.first > b.first : a.second > b.second;
    }
  };
  static constexpr Stronger stronger{};
  index_t k_;
  std::vector<Item> heap_;
};

/// For queries i0 .. i1-1 of Q, the k keys of K with largest f(scale q.k) (softmax: logit,
/// power: |logit|), ties to the lower index, each row in descending order, into out
/// ((i1 - i0) x k). Causal: query i ranks keys 0 .. i only (-1 in the slots beyond i + 1 keys).
/// Scans all keys with GEMM tiles: O((i1 - i0) n d) time, O(tile) workspace.
/// open (n bytes, nullable): only keys with open[j] != 0 are ranked (-1 in the slots beyond them).
void top_keys(const kernels::KernelParams& params, ConstMatrix Q, ConstMatrix K, index_t k,
              index_t i0, index_t i1, index_t* out, std::vector<float>& tile, bool causal = false,
              const std::uint8_t* open = nullptr);

/// flags[a] = 1 if key j0 + a is in `sorted` (ascending), else 0, for a in [0, c): O(c + log).
void mark_members(const std::vector<index_t>& sorted, index_t j0, index_t c, char* flags);

}  // namespace levattn::detail
