// levattn/distributed.hpp: LevAttention with the keys sharded across MPI processes (math.md
// 1.7, docs/design.md "Distributed"). Built as levattn::distributed when MPI is found; every
// function is collective over its communicator: all ranks call it, with their own rows.
#pragma once
#include <mpi.h>

#include <cstdint>

#include "levattn/leverage_scores.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {

/// Rows first .. first + rows - 1 of n: the contiguous block rank `rank` of `size` holds, the
/// first n % size ranks one row more.
struct Shard {
  index_t first = 0, rows = 0;
};
Shard shard_of(index_t n, int rank, int size);

/// Bytes this rank passed to and received from the collectives of one call (the agreement on
/// errors and sizes included).
struct CommVolume {
  std::uint64_t sent = 0, received = 0;
};

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

}  // namespace levattn
