// detail/leverage.hpp: score pass without re-validating K, for callers that already checked it.
#pragma once
#include "levattn/leverage_scores.hpp"

namespace levattn::detail {
/// approximate: always the float32 pass (the caller's own error dominates).
LeverageScores scores_unchecked(ConstMatrix K, const KeyGram& g, bool approximate = false);
/// key_gram(); allow_triangular = false always gives the eigenvector factor B = V_r Lambda_r^-1/2
/// (d x rank, columns by descending eigenvalue), an orthonormalising basis of range(K).
KeyGram key_gram(ConstMatrix K, const LeverageOptions& options, bool allow_triangular);
}  // namespace levattn::detail
