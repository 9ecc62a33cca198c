// collective.hpp: the MPI plumbing of levattn::distributed (defined in collective.cpp): a
// communicator with its byte counts, errors agreed on by every rank before any other collective,
// and the layout of a sharded array. The algorithms (distributed.cpp) and the MPI-IO writer
// (io_rows_mpi.cpp) stand on it.
#pragma once
#include <mpi.h>

#include <climits>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "levattn/distributed.hpp"

namespace levattn::collective {

/// A communicator, this rank's place in it, and where its bytes are counted (nullable).
struct Comm {
  MPI_Comm comm;
  int rank = 0, size = 1;
  CommVolume* volume;
  void count(std::uint64_t sent, std::uint64_t received) const {  // one process communicates nothing
    if (volume && size > 1) volume->sent += sent, volume->received += received;
  }
};

/// comm with this rank's rank and size.
Comm comm_of(MPI_Comm comm, CommVolume* volume);

/// Throws the CollectiveError of a check every rank makes alike on the same data.
[[noreturn]] void fail_together(const std::string& field, const std::string& detail);

template <class T>
MPI_Datatype mpi_type();
template <>
inline MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <>
inline MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }
template <>
inline MPI_Datatype mpi_type<std::int64_t>() { return MPI_INT64_T; }

/// MPI counts are int: a gather of more values than that is refused on every rank alike.
int mpi_count(std::uint64_t values, const char* what);

/// Every rank's `mine` concatenated in rank order (one Allgather of counts, one Allgatherv).
template <class T>
std::vector<T> all_gather(const Comm& c, const std::vector<T>& mine, const char* what) {
  const std::int64_t count = static_cast<std::int64_t>(mine.size());
  std::vector<std::int64_t> counts(static_cast<std::size_t>(c.size));
  MPI_Allgather(&count, 1, MPI_INT64_T, counts.data(), 1, MPI_INT64_T, c.comm);
  std::vector<int> n(counts.size()), at(counts.size() + 1, 0);
  std::uint64_t total = 0;
  for (std::size_t r = 0; r < counts.size(); ++r) total += static_cast<std::uint64_t>(counts[r]);
  mpi_count(total, what);
  for (std::size_t r = 0; r < counts.size(); ++r) n[r] = static_cast<int>(counts[r]), at[r + 1] = at[r] + n[r];
  std::vector<T> out(static_cast<std::size_t>(total));
  MPI_Allgatherv(mine.data(), static_cast<int>(count), mpi_type<T>(), out.data(), n.data(), at.data(), mpi_type<T>(),
                 c.comm);
  // Counted as what this rank passes in once and what it receives of the other ranks' data.
  c.count(8 + sizeof(T) * mine.size(), 8 * static_cast<std::uint64_t>(c.size - 1) + sizeof(T) * (out.size() - mine.size()));
  return out;
}

/// Runs f on this rank; then every rank learns whether it threw on any rank, and if so every rank
/// throws the lowest failing rank's error as CollectiveError ("rank R: field: detail", the field
/// kept). One int Allreduce when nothing fails.
void agree(const Comm& c, const std::function<void()>& f);

/// Every rank's shard of one sharded array, checked to tile 0 .. n - 1 in rank order, with the
/// same number of pairs everywhere and the same width on every rank that holds rows.
struct Layout {
  index_t n = 0, cols = 0, pairs = 0;
  std::vector<Shard> shards;
};

/// The layout of a sharded array from every rank's (first, rows, cols, pairs); fail_together
/// naming `what` unless the shards tile 0 .. n - 1 in rank order with one width and pair count.
Layout layout_of(const Comm& c, index_t first, index_t rows, index_t cols, index_t pairs, const std::string& what);

}  // namespace levattn::collective
