// detail/leverage.hpp: score pass without re-validating K, for callers that already checked it.
#pragma once
#include "levattn/leverage_scores.hpp"

namespace levattn::detail {
/// approximate: always the float32 pass (the caller's own error dominates).
LeverageScores scores_unchecked(ConstMatrix K, const KeyGram& g, bool approximate = false);
}  // namespace levattn::detail
