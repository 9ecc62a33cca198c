// detail/leverage.hpp: score pass without re-validating K, for callers that already checked it.
#pragma once
#include "levattn/leverage_scores.hpp"

namespace levattn::detail {
LeverageScores scores_unchecked(ConstMatrix K, const KeyGram& g);
}  // namespace levattn::detail
