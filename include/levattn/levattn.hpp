// levattn/levattn.hpp: the umbrella header. Include this, link levattn::levattn.
//
//   leverage_scores.hpp  exact leverage scores of K and the Gram factor (docs/design.md)
//   lewis_weights.hpp    l_p Lewis weights, |x|^p sensitivity bounds (docs/design.md)
//   universal_set.hpp    U_eps and top-k sets of keys (docs/design.md)
//   heavy_entries.hpp    every eps-heavy entry of x^2 attention, exactly (docs/design.md); the
//                        brute-force oracle and the agreement of two lists
//   kernel.hpp           the kernel f of attention (softmax, |x|^p) and the logit scale
//   options.hpp          selections and their options; the selection spec text
//   selection.hpp        the Selection (the keys each query attends) and select_keys
//   attention.hpp        attention over a selection: full, leverage, window, sinks, topk, random
//   planted.hpp          the planted test model (docs/design.md)
//   sketch.hpp           CountSketch, SRHT and Gaussian sketches Y = S A
//   reduce.hpp           feature-dimension reduction X (n x d) -> Y (n x m) for softmax Gram
//   evaluate.hpp         how a selection fits attention: mass, heavy recall, output error
//   io.hpp               NumPy .npy / .npz files
//   build_info.hpp       BLAS, ISA and threads in use
#pragma once
#include "levattn/attention.hpp"
#include "levattn/build_info.hpp"
#include "levattn/causal.hpp"
#include "levattn/error.hpp"
#include "levattn/evaluate.hpp"
#include "levattn/heavy_entries.hpp"
#include "levattn/io.hpp"
#include "levattn/kernel.hpp"
#include "levattn/kv_cache.hpp"
#include "levattn/leverage_scores.hpp"
#include "levattn/lewis_weights.hpp"
#include "levattn/matrix.hpp"
#include "levattn/options.hpp"
#include "levattn/planted.hpp"
#include "levattn/reduce.hpp"
#include "levattn/selected_attention.hpp"
#include "levattn/selection.hpp"
#include "levattn/sketch.hpp"
#include "levattn/streaming.hpp"
#include "levattn/universal_set.hpp"
