// The MPI plumbing of levattn::distributed (collective.hpp), and collectively().
#include "collective.hpp"

#include <exception>

namespace levattn::collective {

Comm comm_of(MPI_Comm comm, CommVolume* volume) {
  Comm c{comm, 0, 1, volume};
  MPI_Comm_rank(comm, &c.rank);
  MPI_Comm_size(comm, &c.size);
  return c;
}

[[noreturn]] void fail_together(const std::string& field, const std::string& detail) {
  throw CollectiveError(ErrorKind::invalid_argument, field, detail);
}

int mpi_count(std::uint64_t values, const char* what) {
  if (values > static_cast<std::uint64_t>(INT_MAX))
    fail_together(what, std::to_string(values) + " values to exchange, more than one MPI call takes");
  return static_cast<int>(values);
}

void agree(const Comm& c, const std::function<void()>& f) {
  ErrorKind kind = ErrorKind::internal;
  std::string field, detail;
  int failed = INT_MAX;
  try {
    f();
  } catch (const Error& e) {
    kind = e.kind(), field = e.field(), detail = e.detail(), failed = c.rank;
  } catch (const std::exception& e) {
    detail = e.what(), failed = c.rank;
  }
  int first = INT_MAX;
  MPI_Allreduce(&failed, &first, 1, MPI_INT, MPI_MIN, c.comm);
  c.count(sizeof(int), sizeof(int));
  if (first == INT_MAX) return;
  // The failing rank's kind, field and detail, so that callers can still name the field's source.
  std::string text = field + detail;
  int head[3] = {static_cast<int>(kind), static_cast<int>(field.size()), static_cast<int>(text.size())};
  MPI_Bcast(head, 3, MPI_INT, first, c.comm);
  text.resize(static_cast<std::size_t>(head[2]));
  MPI_Bcast(text.data(), head[2], MPI_CHAR, first, c.comm);
  c.count(c.rank == first ? 12 + text.size() : 0, c.rank == first ? 0 : 12 + text.size());
  const auto split = static_cast<std::size_t>(head[1]);
  throw CollectiveError(static_cast<ErrorKind>(head[0]), first, text.substr(0, split), text.substr(split));
}

Layout layout_of(const Comm& c, index_t first, index_t rows, index_t cols, index_t pairs, const std::string& what) {
  const std::int64_t mine[4] = {first, rows, cols, pairs};
  std::vector<std::int64_t> all(static_cast<std::size_t>(4 * c.size));
  MPI_Allgather(mine, 4, MPI_INT64_T, all.data(), 4, MPI_INT64_T, c.comm);
  c.count(32, 32 * static_cast<std::uint64_t>(c.size - 1));
  Layout l;
  l.pairs = all[3];
  for (int r = 0; r < c.size; ++r) {
    const std::int64_t* s = all.data() + 4 * r;
    if (s[0] != l.n || s[1] < 0)
      fail_together(what, "rank " + std::to_string(r) + " holds rows from " + std::to_string(s[0]) + ", expected " +
                              std::to_string(l.n) + " (shards contiguous in rank order from row 0)");
    if (s[3] != l.pairs)
      fail_together(what, "ranks hold different numbers of (batch, head) pairs (" + std::to_string(l.pairs) + " and " +
                              std::to_string(s[3]) + ")");
    if (s[1] > 0) {
      if (l.cols != 0 && s[2] != l.cols)
        fail_together(what, "ranks hold rows of different widths (" + std::to_string(l.cols) + " and " +
                                std::to_string(s[2]) + ")");
      l.cols = s[2];
    }
    l.shards.push_back({s[0], s[1]});
    l.n += s[1];
  }
  if (l.n == 0 || l.cols < 1 || l.pairs < 1) fail_together(what, "expected a non-empty array across the ranks");
  return l;
}

}  // namespace levattn::collective

namespace levattn {

void collectively(MPI_Comm comm, const std::function<void()>& f, CommVolume* volume) {
  collective::agree(collective::comm_of(comm, volume), f);
}

}  // namespace levattn
