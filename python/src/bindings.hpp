// The binding's parts, one per group of library headers; _core's module calls each once
// (core.cpp), in this order.
#pragma once
#include <pybind11/pybind11.h>

namespace levattn::python {

/// leverage_scores.hpp, universal_set.hpp, heavy_entries.hpp, causal.hpp, lewis_weights.hpp:
/// LeverageOptions and the score, set and heavy-entry results and functions.
void bind_scores(pybind11::module_& m);
/// reduce.hpp, sketch.hpp, planted.hpp: dimension reduction, sketches, planted instances.
void bind_sketches(pybind11::module_& m);
/// options.hpp, selection.hpp, attention.hpp, selected_attention.hpp, evaluate.hpp: attention,
/// selections, the evaluator and the PyTorch op's entry points.
void bind_attention(pybind11::module_& m);
/// streaming.hpp, kv_cache.hpp: StreamingUniversalSet and KVCache.
void bind_streaming(pybind11::module_& m);
/// io.hpp: .npy and .npz files.

}  // namespace levattn::python
