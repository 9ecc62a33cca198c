// levattn/streaming.hpp: the x^2 universal set in one pass over the keys (docs/design.md,
// "Streaming"): keys (and values) arrive in blocks of any size; the state holds the Gram matrix
// and the keys that can still be eps-heavy, never all the keys.
#pragma once
#include <filesystem>
#include <memory>
#include <vector>

#include "levattn/kernel.hpp"
#include "levattn/heavy_entries.hpp"
#include "levattn/leverage_scores.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {

/// One pass over the keys of one head. Adding keys adds a PSD term to M = K^T K, so every
/// leverage score only falls as keys arrive: a key whose score drops below eps (less the
/// scores' proven rounding) can never be eps-heavy later and is dropped for good.
///
/// State: M in float64 as partial sums (d^2 min(16, 32M / d^2) numbers), at most 1024 waiting
/// rows, and the candidates (index, key row, value row), pruned once they exceed
/// max(1024, 2 d / eps) (then twice what the last prune left): O(d^2 + (d / eps + block)(d + dv))
/// memory, whatever the number of keys. Cost: O(d^2) per key for M, plus a prune
/// (O(d^3 + |C| d^2)) whenever the candidates double, about the offline score pass over all keys
/// in total. Not thread-safe for concurrent calls on one object (const ones included: they
/// share nothing mutable, but push must not run beside them); distinct objects are independent.
class StreamingUniversalSet {
 public:
  /// d >= 1 key columns, dv >= 0 value columns (0: keys only), eps in (0, 1]; options.method must
  /// be exact (ridge and rank_rtol apply as in leverage_scores). Throws Error(invalid_argument).
  StreamingUniversalSet(index_t d, index_t dv, double eps, const LeverageOptions& options = {});

  /// Appends keys (rows x d) and, when dv > 0, their values (rows x dv; an empty matrix when
  /// dv == 0). Any number of rows, including 0. Throws Error(invalid_argument) on wrong widths,
  /// mismatched row counts or non-finite entries (the state is then unchanged).
  void push(ConstMatrix keys, ConstMatrix values = {});

  /// The universal set of every key pushed so far: the same indices and scores as the offline
  /// universal_set(K, eps, options) on those keys (the same M bits, factor and score pass),
  /// for any split into blocks, as long as the scores' rounding bound stays below 1e-4 (the
  /// margin pruning leaves; score_rel_error_bound reports it). Pruning scores keep the
  /// directions down to 0.1 sqrt(eps) rank_rtol of the largest singular value, so that a
  /// direction that later enters the rank cannot have lost its keys. O(d^3 + |C| d^2).
  UniversalSet universal_set() const;

  /// The exact eps-heavy entries of x^2 attention of Q (m x d) against every key pushed so far:
  /// A_ij = (q_i.k_j)^2 / (q_i^T M q_i) >= eps, with j in the universal set (no other key can
  /// be eps-heavy). Queries with q^T M q = 0 (to rounding) are listed in zero_rows.
  /// O(m d^2 + m |U| d). Throws Error(invalid_argument) with a ridge (ridge scores are below the
  /// x^2 sensitivities, so their set can miss heavy entries).
  HeavyEntries heavy_entries(ConstMatrix Q) const;

  /// Attention of Q (m x d) over the kept keys (the universal set) and their values, with the
  /// kernel, p and scale of `kernel`: m x dv, row-major. An
  /// empty universal set (no key reaches eps) gives rows of 0, as attention over no keys does.
  /// Throws Error(invalid_argument) when dv == 0 or no key was pushed.
  std::vector<float> attention(ConstMatrix Q, const KernelOptions& kernel = {}) const;

  index_t n() const;           ///< keys pushed so far
  index_t d() const;
  index_t dv() const;
  double eps() const;
  index_t candidates() const;  ///< keys the state still holds (the universal set and more)
  /// The keys the state holds: their indices (ascending), key rows (candidates() x d) and value
  /// rows (candidates() x dv); valid until the next push or prune.
  const std::vector<index_t>& candidate_indices() const;
  ConstMatrix candidate_keys() const;
  ConstMatrix candidate_values() const;
  /// M = K^T K over every key pushed so far (d x d, row-major, float64): O(d^2 partials).
  std::vector<double> gram() const;

  /// Drops now every candidate that can no longer be eps-heavy (push does so lazily, when the
  /// candidates double): after it, the candidates are the keys whose score against the current
  /// M is >= eps less the proven rounding and margin (a superset of the current universal set),
  /// at most about d / eps of them. O(d^3 + |C| d^2).
  void prune();

  /// From now on pruning keeps the first `first` and the last `last` keys pushed whatever their
  /// scores (a KV cache's sinks and window); universal_set() and heavy_entries() are unchanged.
  /// Saved with the state. Throws Error(invalid_argument) on a negative count.
  void protect(index_t first, index_t last);
  std::size_t workspace_bytes() const;       ///< bytes the state holds now
  std::size_t peak_workspace_bytes() const;  ///< the most it has held since construction

  /// Writes the state to `path` atomically as an .npz archive of named members (version, eps,
  /// ridge, rank_rtol, n, gram_blocks, prune_at, protect_first, protect_last,
  /// peak_workspace_bytes, gram_partials, gram_pending, index, keys, values: docs/design.md),
  /// which numpy.load reads; the zip's CRC-32 guards each member. A restored state gives
  /// bit-identical results. Throws Error(io).
  void save(const std::filesystem::path& path) const;
  /// Reads a state written by save(). A truncated or corrupted (CRC-32) archive, a missing or
  /// mistyped member, another version, or sizes that disagree with each other throw Error(io)
  /// naming the file and the member or field; so does a version-2 binary state.
  static StreamingUniversalSet load(const std::filesystem::path& path);

  ~StreamingUniversalSet();
  StreamingUniversalSet(StreamingUniversalSet&&) noexcept;
  StreamingUniversalSet& operator=(StreamingUniversalSet&&) noexcept;

  struct State;  ///< the implementation's (opaque)

 private:
  std::unique_ptr<State> s_;
};

}  // namespace levattn
