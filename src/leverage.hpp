// leverage.hpp: score pass without re-validating K, for callers that already checked it.
#pragma once
#include "levattn/leverage_scores.hpp"

namespace levattn::detail {
/// How the score pass may shortcut.
struct ScorePass {
  bool approximate = false;  ///< always the float32 pass (the caller's own error dominates)
  /// K holds exactly the rows g was computed from: full row rank then means every score is 1.
  bool rows_of_gram = true;
};
LeverageScores scores_unchecked(ConstMatrix K, const KeyGram& g, ScorePass pass = {});
/// A KeyGram from an already accumulated M = K^T K (d x d, symmetric): the factor key_gram
/// would compute from the same M (options: ridge, rank_rtol).
KeyGram gram_factor(std::vector<double> gram, index_t d, const LeverageOptions& options);
/// key_gram(); allow_triangular = false always gives the eigenvector factor B = V_r Lambda_r^-1/2
/// (d x rank, columns by descending eigenvalue), an orthonormalising basis of range(K).
KeyGram key_gram(ConstMatrix K, const LeverageOptions& options, bool allow_triangular);
}  // namespace levattn::detail
