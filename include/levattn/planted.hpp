// levattn/planted.hpp: the planted model of docs/design.md, for tests, demos and benchmarks.
#pragma once
#include <cstdint>
#include <vector>

#include "levattn/matrix.hpp"

namespace levattn {

struct PlantedOptions {
  index_t n = 0;            ///< keys (and queries unless m is set), >= 1
  index_t d = 0;            ///< dimension, >= 1
  index_t relevant = 8;     ///< planted keys, 1 <= relevant <= min(n, d)
  index_t m = 0;            ///< queries; 0 means n
  std::uint64_t seed = 0;
  double noise = 1.0;       ///< expected norm of a noise key (entries N(0, noise^2 / d)), > 0
  /// Norm of a relevant key; 0 means 2 * noise * sqrt(n / d), which gives each relevant key a
  /// leverage score of about 0.8 and every noise key about d / n.
  double signal = 0.0;
  /// Norm of a query's planted component; 0 means (ln n + 6) * sqrt(d) / signal, so that under
  /// softmax with scale 1/sqrt(d) the query's relevant key outweighs all n noise keys.
  double query_norm = 0.0;
};

/// Q (m x d), K (n x d), V (n x d) and the planted structure. Deterministic in (options): the
/// same seed gives the same instance on any machine and thread count (counter-based RNG).
struct PlantedInstance {
  DenseMatrix<float> Q, K, V;
  std::vector<index_t> relevant;      ///< positions of the relevant keys, ascending
  std::vector<index_t> query_target;  ///< per query, the relevant key it is aligned with
};

/// Relevant keys are signal * u_r for orthonormal random directions u_r at random distinct
/// positions; noise keys are Gaussian; query i is query_norm * u_{t(i)} plus Gaussian noise of
/// norm about noise, with t(i) uniform; values are standard Gaussian. O((n + m) d + d^2 r) time.
/// Throws Error(invalid_argument) on sizes or norms outside the documented ranges.
PlantedInstance planted(const PlantedOptions& options);

}  // namespace levattn
