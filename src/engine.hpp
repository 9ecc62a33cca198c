// The attention engine's entry for the library's own callers (attention(), cluster's shared part,
// the distributed blocks): selected_attention_forward<float> with progress reports. Defined in
// selected_attention.cpp beside the engine's forward (its tiles: engine_tiles.hpp).
#pragma once
#include <functional>

#include "levattn/options.hpp"
#include "levattn/selection.hpp"

namespace levattn::engine {

/// What a caller that made the selection itself (select_keys' own code) found scanning q, k and
/// v: every entry finite, and the largest |q| and |k|.
struct CheckedInputs {
  double max_q = 0.0, max_k = 0.0;
};

/// selected_attention_forward<float> (same buffers, checks and errors; stat may be null, for
/// callers that need the output alone), reporting the fraction of query tiles done to `progress`
/// (nullable) from the calling thread. `checked`: the caller made the selection and scanned the
/// inputs (finite, with these maxima), so the engine checks neither again. Returns the rows with
/// no key.
index_t forward(const AttentionShape& shape, const Selection& selection, const KernelOptions& kernel, const float* q,
             const float* k, const float* v, float* out, float* stat, const std::function<void(double)>& progress,
             const CheckedInputs* checked = nullptr);

/// Merges two disjoint parts of each row's keys by their row statistics (log-sum-exp): with
/// L = log(e^a + e^b), out = e^(a - L) out + e^(b - L) out_b and stat = L, for `rows` rows of dv
/// (stat +inf: the part has no key). The weights are formed in double. T is float or double.
template <class T>
void merge(index_t rows, index_t dv, T* out, T* stat, const T* out_b, const T* stat_b);

/// Whether float32 logits can overflow: |scale q.k| <= |scale| d max|q| max|k| (Cauchy-Schwarz).
bool logits_can_overflow(double scale, index_t d, double max_q, double max_k);

}  // namespace levattn::engine
