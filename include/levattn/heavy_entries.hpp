// levattn/heavy_entries.hpp: every eps-heavy entry of x^2 attention, exactly (docs/design.md).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "levattn/leverage_scores.hpp"

namespace levattn {

struct HeavyEntry {
  index_t query = 0;
  index_t key = 0;
  double value = 0.0;  ///< A_ij = (q_i.k_j)^2 / sum_l (q_i.k_l)^2
};

struct HeavyEntries {
  std::vector<HeavyEntry> entries;       ///< sorted by query, then key
  std::vector<index_t> zero_rows;        ///< queries whose row normaliser is zero (ascending)
  index_t universal_size = 0;            ///< |U_eps| searched
  index_t rank = 0;                      ///< numerical rank of K
  double p = 2.0;                        ///< f(x) = |x|^p
  /// How the row normalisers were computed: "exact (||R q||^2, K = QR)" (p = 2), "exact (all
  /// keys)" or "sampled" (then values are (1 +- gamma) estimates, see HeavyOptions).
  std::string normaliser;
  index_t samples = 0;  ///< sampled: keys drawn
  double gamma = 0.0;   ///< sampled: every normaliser within a factor (1 +- gamma), prob. >= 1 - delta
  /// countsketch search (HeavySearch): rows t and buckets b of the sketch, and the (query, key)
  /// pairs whose estimate passed the threshold and were verified exactly.
  index_t sketch_rows = 0, sketch_buckets = 0, candidates = 0;
};

/// How heavy_entries computes the row normalisers Z_i = sum_l |q_i.k_l|^p.
enum class Normaliser {
  exact,    ///< p = 2: q^T M q in O(d^2) per query; otherwise every key, O(n d) per query
  sampled,  ///< r keys drawn with probability proportional to their sensitivity bounds
};

/// "exact" / "sampled", and the inverse (Error(invalid_argument) naming the choices otherwise).
std::string to_string(Normaliser normaliser);
Normaliser parse_normaliser(const std::string& name);

/// How heavy_entries finds each query's heavy keys among the universal set U (x^2, exact
/// normalisers; docs/design.md).
enum class HeavySearch {
  exact,        ///< x_i = K_U q_i for every key of U: one GEMM, O(m |U| d)
  countsketch,  ///< a CountSketch of K_U, per query its t b estimates, candidates verified exactly
};

/// "exact" / "countsketch", and the inverse (Error(invalid_argument) naming the choices otherwise).
std::string to_string(HeavySearch search);
HeavySearch parse_heavy_search(const std::string& name);

struct HeavyOptions {
  double p = 2.0;  ///< exponent, > 0
  /// Causal x^2 attention (query i over keys 0 .. i, m == n): the entries of
  /// causal_heavy_entries (causal.hpp). Needs p = 2 and exact normalisers.
  bool causal = false;
  Normaliser normaliser = Normaliser::exact;
  /// sampled: number of keys drawn; 0 means r = ceil(3 T ln(2m / delta) / gamma^2), T the total
  /// sensitivity bound. With r >= n the exact normaliser is used instead (it is then cheaper).
  index_t samples = 0;
  double gamma = 0.1;   ///< sampled: target accuracy in (0, 1) when samples == 0
  /// Failure probability in (0, 1) of the randomised part: the sampled normalisers, or the
  /// countsketch search (each eps-heavy entry is missed with probability below delta in all).
  double delta = 0.01;
  /// exact, or countsketch (p = 2 with exact normalisers, not causal): per (batch, head) pair a
  /// CountSketch of the universal keys, t = ceil(log2(m / (eps delta))) rows of b = ceil(64 / eps)
  /// buckets, from the seed's stream.
  HeavySearch search = HeavySearch::exact;
  std::uint64_t seed = 0;
  /// Scores behind the universal set: numerical rank, and the exact or sketched method. A sketch
  /// applies with sampled normalisers only: exact x^2 normalisers need the exact factor of K,
  /// which costs more than the sketch saves (Error(invalid_argument) says so).
  LeverageOptions leverage;
};

/// All (i, j, A_ij) with A_ij >= eps for A = D^-1 (Q K^T)^2 (entrywise square, rows summing to 1).
///
/// Exact, not approximate: only keys of the universal set U_eps are examined, which contains every
/// heavy key, and the row normaliser Z_i = sum_l (q_i.k_l)^2 is computed as the sum of squares
/// ||R q_i||^2 with R the triangular factor of a Householder QR K = Q R in float64 (never as
/// q^T (K^T K) q, which cancels for queries nearly orthogonal to range(K)).
/// Accuracy: with rho_i = n d u ||K||_F ||q_i|| / sqrt(Z_i) (u = 2^-53, the worst-case rounding
/// of R q_i), every reported value is within a factor (1 +- (2 rho_i + rho_i^2))^-1 times
/// (1 +- 2 d u ||q_i|| ||k_j|| / |q_i.k_j|) of the exact A_ij of the float32 inputs; every
/// entry with A_ij >= eps (1 + 2 rho_i + rho_i^2) is reported. A query with sqrt(Z_i) <=
/// n d u ||K||_F ||q_i|| (q_i orthogonal to every key, to float64 resolution) has no defined row:
/// it is listed in zero_rows and yields no entries.
/// Q: m x d, K: n x d, both finite and non-empty, equal d. eps in (0, 1].
/// Complexity: O(n d^2 + m d^2 + m |U| d) time with |U| <= d / eps; never touches all n keys per
/// query. Workspace O(d^2 + |U| d + block * |U|).
/// Keys of K whose condition number exceeds 1 / LeverageOptions::rank_rtol (1e5) lie partly in
/// directions treated as null; for such K the universal-set guarantee holds for K projected onto
/// its numerical range.
HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps);

/// With options.search == countsketch (p = 2, exact normalisers): the same entries found through
/// a CountSketch S of K_U (t rows, b buckets, above): per query y = (S K_U) q, each key's estimate
/// median_r sign_r(j) y[r, bucket_r(j)], and the keys whose |estimate| >= sqrt(eps Z_i) -
/// 4 sqrt(Z_i / b) verified exactly. Each row's error is below 4 ||K_U q|| / sqrt(b) <=
/// 4 sqrt(Z_i / b) with probability >= 15/16 (Chebyshev), so a heavy key is missed only if half
/// of the t rows fail: probability <= 2^-t per entry, <= delta over the at most m / eps of them.
/// Every reported value is exact (no false entry). O(|U| t d + m (t b d + |U| t) + candidates d)
/// time against O(m |U| d): it pays only where |U| d exceeds t b d + |U| t, i.e. with d large
/// against t (docs/benchmarks.md measures where).
///
/// All (i, j, A_ij) with A_ij >= eps for A = D^-1 |Q K^T|^p, any p > 0 (docs/design.md).
///
/// Keys are searched in the universal set { j : t_j >= eps } of the sensitivity bounds t_j
/// (lewis_weights.hpp), which holds the key of every eps-heavy entry; |U| <= d^max(1,p/2) / eps.
/// Normalisers:
///  - exact: p = 2 as heavy_entries(Q, K, eps); otherwise Z_i over all keys by blocked GEMM,
///    O(n d) per query. The result equals brute force.
///  - sampled: r keys l_1..l_r drawn i.i.d. with pi_l = t_l / T; Z^_i = (1/r) sum_s
///    |q_i.k_{l_s}|^p / pi_{l_s}. Each term is at most T Z_i (as |q.k_l|^p <= s_l Z_i <= t_l Z_i),
///    so by the Chernoff bound and a union bound over the m queries, with probability >= 1 - delta
///    every Z^_i is within (1 +- gamma) of Z_i for gamma = sqrt(3 T ln(2m / delta) / r) (gamma <= 1).
///    Entries with A^_ij >= eps / (1 + gamma) are reported: a superset of the eps-heavy entries
///    whose values are within (1 +- gamma)^-1 of the truth. O(r d) per query.
/// Complexity: Lewis weights O(n d^2) per iteration, then as above. Throws Error(invalid_argument)
/// on bad shapes, non-finite input, eps outside (0, 1], p <= 0, gamma or delta outside (0, 1).
HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps, const HeavyOptions& options);

/// heavy_entries(Q_bh, K_bh, eps, options) for every (batch, head) pair of Q (batch, heads, m, d)
/// and K (batch, heads, n, d), in b * heads + h order. Pairs run in parallel, each on one thread;
/// sampled normalisers draw an independent sample per pair (stream: the pair's index). Throws as
/// the single-pair version, and Error(invalid_argument) if (batch, heads) differ.
std::vector<HeavyEntries> heavy_entries(const Tensor4Ref& Q, const Tensor4Ref& K, double eps,
                                        const HeavyOptions& options);

/// Every (i, j, A_ij) with A_ij >= eps for A = row-normalised (Q K^T)^2 by scanning all keys of
/// every query (float64 arithmetic): the oracle heavy_entries() is compared with. O(m n d) time,
/// O(32 n) memory per thread: for evaluation, not for production paths. Queries whose
/// normaliser is exactly zero go to zero_rows.
HeavyEntries heavy_entries_brute_force(ConstMatrix Q, ConstMatrix K, double eps);

/// How a list of heavy entries agrees with the true list.
struct HeavyAgreement {
  index_t common = 0;               ///< (query, key) pairs in both
  double recall = 1.0;              ///< common / |truth| (1 when truth is empty)
  double precision = 1.0;           ///< common / |found| (1 when found is empty)
  double max_rel_value_error = 0.0; ///< max |found - truth| / truth over the common pairs
};

/// Compares `found` with `truth` (both sorted by query, then key, as heavy_entries and
/// heavy_entries_brute_force return them) by one merge: O(|found| + |truth|).
HeavyAgreement compare_heavy_entries(const HeavyEntries& found, const HeavyEntries& truth);

}  // namespace levattn
