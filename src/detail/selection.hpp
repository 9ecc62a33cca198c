// detail/selection.hpp: the per-head key selections that are not leverage scores.
#pragma once
#include <cstdint>
#include <vector>

#include "detail/rng.hpp"
#include "kernels/online_attention.hpp"
#include "levattn/attention.hpp"

namespace levattn::detail {

/// Throws Error(invalid_argument) unless the kernel's p (power) and scale (NaN or finite) are valid.
void check_kernel(const AttentionOptions& o);

/// k distinct keys of [0, n) uniformly at random (Floyd's algorithm), ascending; a pure function
/// of (n, k, rng's stream). k >= n returns every key.
std::vector<index_t> random_keys(index_t n, index_t k, const CounterRng& rng);

/// For queries i0 .. i1-1 of Q, the k keys of K with largest f(scale q.k) (softmax: logit,
/// power: |logit|), ties to the lower index, each row in descending order, into out
/// ((i1 - i0) x k). Scans all keys with GEMM tiles: O((i1 - i0) n d) time, O(tile) workspace.
void top_keys(const kernels::KernelParams& params, ConstMatrix Q, ConstMatrix K, index_t k,
              index_t i0, index_t i1, index_t* out, std::vector<float>& tile);

}  // namespace levattn::detail
