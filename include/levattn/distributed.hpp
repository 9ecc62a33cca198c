// levattn/distributed.hpp: LevAttention with the rows of Q, K and V sharded across MPI processes
// (math.md 1.7, docs/design.md "Distributed"). Built as levattn::distributed when MPI is found.
// Every function but shard_of is collective over its communicator: all ranks call it, each with
// its own rows, and an error on any rank makes every rank throw (see collectively()).
//
// Layout: an array of n rows per (batch, head) pair is split into contiguous row blocks in rank
// order, rank r holding rows first_r .. first_r + rows_r - 1 of every pair (shard_of gives the
// even split; any contiguous tiling of 0 .. n - 1 is accepted, empty ranks included). A local
// Tensor4Ref is then (batch, heads, rows_r, cols).
#pragma once
#include <mpi.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <vector>

#include "levattn/attention.hpp"
#include "levattn/error.hpp"
#include "levattn/heavy_entries.hpp"
#include "levattn/leverage_scores.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {

/// Rows first .. first + rows - 1 of n: the contiguous block rank `rank` of `size` holds, the
/// first n % size ranks one row more.
struct Shard {
  index_t first = 0, rows = 0;
};
Shard shard_of(index_t n, int rank, int size);

/// Bytes this rank passed to the collectives of one call (its own data, counted once whatever
/// algorithm MPI spreads it with) and received of other ranks' data; the agreement on errors and
/// sizes included, nothing on a communicator of one rank. Accumulates: a caller may pass one to
/// several calls.
struct CommVolume {
  std::uint64_t sent = 0, received = 0;
};

/// The error every rank of a communicator throws together (from collectively(): "rank R: " and
/// the failing rank's error, its field kept; or a check made the same way on every rank's copy of
/// the same data, such as the shards' sizes, without a rank): a caller may report it once and
/// exit on every rank. Any other exception out of a collective call means a rank failed alone;
/// the others may be waiting for it, and the caller should MPI_Abort.
class CollectiveError : public Error {
 public:
  using Error::Error;
  /// Rank `rank`'s error about `field`: what() == "rank R: field: detail" (no "rank R: " when
  /// rank < 0).
  CollectiveError(ErrorKind kind, int rank, const std::string& field, const std::string& detail)
      : Error(kind, rank < 0 ? std::string() : "rank " + std::to_string(rank), field, detail), rank_(rank) {}
  /// The rank whose error this is, or -1 when every rank made the same check.
  int rank() const noexcept { return rank_; }

 private:
  int rank_ = -1;
};

/// Runs f on this rank (f must not call collectives of comm); then every rank learns whether f
/// threw on any rank. If one did, every rank throws CollectiveError with the lowest failing
/// rank's kind and message, prefixed "rank R: " (an exception other than Error counts as
/// ErrorKind::internal). One int Allreduce when nothing fails, so no rank ever waits on one
/// that gave up.
void collectively(MPI_Comm comm, const std::function<void()>& f, CommVolume* volume = nullptr);

/// How a distributed selection is made.
enum class DistributedMode {
  /// math.md 1.7, exact for x^2 (p = 2, leverage scores): one Allreduce of K_r^T K_r (d^2 float64
  /// per pair), exact scores of the local keys, one Allgatherv of the selected keys. The set is
  /// the single-process U_eps of the whole K (up to the Gram's summation order).
  exact,
  /// Composable, for every p (|x|^p sensitivity bounds, math.md 1.4): each rank selects U_eps of
  /// its own keys, the union's rows are gathered, and every rank selects U_eps again within the
  /// union. A key's score within a subset is >= its score in all keys, so the result contains
  /// the single-process U_eps (it may hold more keys). Communication sum_r |U_r| d + |U| (d + dv).
  two_round,
};

/// "exact" / "two_round", and the inverse (Error(invalid_argument) naming the choices otherwise).
std::string to_string(DistributedMode mode);
DistributedMode parse_distributed_mode(const std::string& name);

/// The exact x^2 universal set of K (n x d) whose rows are sharded across comm in rank order:
/// this rank holds K_local, rows first .. first + K_local.rows - 1 (shards contiguous, together
/// 0 .. n - 1; a rank may hold none). One Allreduce of K_r^T K_r (d^2 float64), the exact scores
/// of the local rows against the global factor, one Allgatherv of the selected (index, score)
/// pairs: communication O(d^2 + |U|) numbers per rank, independent of n. Every rank returns the
/// same set: universal_set(leverage_scores(K), eps) of the whole K, up to the rounding of the
/// Gram's sum order (the partial sums of other shards). O(n_r d^2 + d^3) time per rank.
/// Errors are collective: bad input on any rank (a non-finite row, mismatched d, shards that do
/// not tile 0 .. n - 1, eps outside (0, 1]) makes every rank throw Error with that rank's
/// message, prefixed "rank R: ", and no rank waits forever.
UniversalSet distributed_universal_set(MPI_Comm comm, ConstMatrix K_local, index_t first, double eps,
                                       const LeverageOptions& options = {}, CommVolume* volume = nullptr);

/// universal_sets(K, options) of a sharded stack K (batch, heads, n, d): per pair, in b * heads
/// + h order, the set of `mode` (exact: options.p == 2, exact scores; two_round: any p > 0).
/// options takes eps (top_k is refused: a global top-k is not one of these modes). Indices are
/// global (0 .. n - 1), the same on every rank; scores are the global ones (exact) or those
/// within the union (two_round: an upper bound on the global score). Per rank O(pairs (n_r d^2
/// + d^3)) time (two_round: plus the sensitivities of the union), communication per pair
/// O(d^2 + |U|) (exact) or O((sum_r |U_r|) d) numbers (two_round).
std::vector<UniversalSet> distributed_universal_sets(MPI_Comm comm, const Tensor4Ref& K_local, index_t first,
                                                     const UniversalOptions& options, DistributedMode mode,
                                                     CommVolume* volume = nullptr);

/// heavy_entries(Q, K, eps) (exact x^2, p = 2) of sharded Q (batch, heads, m, d) and K (batch,
/// heads, n, d): this rank's entries, for its queries q_first .. q_first + Q_local.rows - 1 (query
/// and key indices global; per pair sorted by query, then key; zero_rows global). The keys' R
/// factor is a tall-skinny QR of the ranks' R_r (P d^2 float64 gathered), U_eps is found as in
/// distributed_universal_set and its key rows gathered (|U| d floats): communication O(P d^2 +
/// |U| d), independent of m and n. Z_i = ||R q_i||^2 as in the single-process call, so values
/// agree with it to rounding. O(m_r d (d + |U|) + n_r d^2 + P d^3) time per rank.
std::vector<HeavyEntries> distributed_heavy_entries(MPI_Comm comm, const Tensor4Ref& Q_local, index_t q_first,
                                                    const Tensor4Ref& K_local, index_t k_first, double eps,
                                                    CommVolume* volume = nullptr);

/// Every rank's entries (of distributed_heavy_entries), pair by pair, concatenated in rank order
/// on `root` (so sorted by query, then key, when the query shards are in rank order); the other
/// ranks get pairs with no entries. The per-pair fields (universal_size, rank, normaliser) are
/// root's. Communication: the entries themselves (24 bytes each) to root.
std::vector<HeavyEntries> gather_heavy_entries(MPI_Comm comm, const std::vector<HeavyEntries>& local, int root,
                                               CommVolume* volume = nullptr);

/// attention(Q, K, V, options) for this rank's queries, with Q (batch, heads, m, d) sharded by
/// rows (this rank: q_first .. q_first + Q_local.rows - 1) and K, V (batch, heads, n, d / dv)
/// sharded by rows the same way as each other (this rank: k_first ..). Writes out_local
/// (batch, heads, Q_local.rows, dv). Selections:
///  - leverage (eps; mode exact: softmax or p = 2, two_round: any p): the set of
///    distributed_universal_sets, its K and V rows gathered (|U| (d + dv) floats per pair);
///  - window (and the window / sinks of leverage): the keys i - w .. i + w of this rank's
///    queries and the first `sinks` keys are fetched from the ranks that hold them by one
///    Alltoallv: with queries and keys sharded alike (self-attention, m == n) a halo of at most
///    2 w + sinks rows; with other shards, whatever keys the window of this rank's queries covers;
///  - full: the dense reference as a ring: the K, V blocks pass once around the ranks, each
///    rank merging the partial softmax (log-sum-exp) of every block into its queries' rows, in
///    float64. Communication O(n (d + dv)) per rank: the exact baseline, not a scalable mode.
/// The output equals attention() on the whole arrays to float32 rounding (the summation order
/// differs), provided no score lies within rounding of eps. Causal attention, topk, random,
/// cluster and key budgets (top_k, adaptive) are refused with Error(invalid_argument), as are
/// the errors attention() reports, on every rank. Communication of the leverage and window
/// modes does not grow with n when queries and keys are sharded alike; see docs/design.md for
/// the per-rank cost. Local queries run in blocks of max(4096, 4 w), each with its w rows of
/// padding, so no copy of the shard is made. The AttentionResult holds the sizes attention()
/// reports, over all ranks (shared_sizes, mean_keys_per_query, empty_rows; the seconds are this
/// rank's); its selection is not returned (return_selection is refused).
AttentionResult distributed_attention(MPI_Comm comm, const Tensor4Ref& Q_local, index_t q_first,
                                                 const Tensor4Ref& K_local, const Tensor4Ref& V_local,
                                                 index_t k_first, float* out_local, const AttentionOptions& options,
                                                 DistributedMode mode = DistributedMode::exact,
                                                 CommVolume* volume = nullptr);

/// Writes a float32 .npy file of shape `shape` (2-D to 4-D; rows = shape[-2]) from row shards:
/// this rank's rows first .. first + rows - 1 of every (batch, head) pair, in `local` (pairs x
/// rows x cols). By MPI-IO into "<path>.tmp.<random>" beside the target, which rank 0 renames
/// over `path` once every rank's write has succeeded: the file is complete or as it was before.
/// No row passes between ranks. Throws (on every rank) Error(io) naming the path, and
/// Error(invalid_argument) if the shards do not tile the rows.
void write_npy_rows(MPI_Comm comm, const std::filesystem::path& path, const std::vector<index_t>& shape,
                    index_t first, index_t rows, const float* local, CommVolume* volume = nullptr);

}  // namespace levattn
