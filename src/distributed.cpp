// Distributed x^2 universal sets: the key Gram summed by one Allreduce, exact local scores, the
// selected keys gathered; errors agreed on by every rank before any other collective.
#include "levattn/distributed.hpp"

#include <algorithm>
#include <climits>
#include <cmath>
#include <exception>
#include <string>
#include <vector>

#include "detail/gram.hpp"
#include "detail/leverage.hpp"
#include "detail/validate.hpp"

namespace levattn {
namespace {

struct Comm {
  MPI_Comm comm;
  int rank = 0, size = 1;
  CommVolume* volume;
  void count(std::uint64_t sent, std::uint64_t received) const {
    if (volume) volume->sent += sent, volume->received += received;
  }
};

Comm comm_of(MPI_Comm comm, CommVolume* volume) {
  Comm c{comm, 0, 1, volume};
  MPI_Comm_rank(comm, &c.rank);
  MPI_Comm_size(comm, &c.size);
  return c;
}

// Runs f on this rank, then every rank learns whether any rank failed; if one did, every rank
// throws the lowest failing rank's error (kind and message).
template <class F>
void agree(const Comm& c, F&& f) {
  ErrorKind kind = ErrorKind::internal;
  std::string message;
  int failed = INT_MAX;
  try {
    f();
  } catch (const Error& e) {
    kind = e.kind(), message = e.what(), failed = c.rank;
  } catch (const std::exception& e) {
    message = e.what(), failed = c.rank;
  }
  int first = INT_MAX;
  MPI_Allreduce(&failed, &first, 1, MPI_INT, MPI_MIN, c.comm);
  c.count(sizeof(int), sizeof(int));
  if (first == INT_MAX) return;
  int head[2] = {static_cast<int>(kind), static_cast<int>(message.size())};
  MPI_Bcast(head, 2, MPI_INT, first, c.comm);
  message.resize(static_cast<std::size_t>(head[1]));
  MPI_Bcast(message.data(), head[1], MPI_CHAR, first, c.comm);
  c.count(c.rank == first ? 8 + message.size() : 0, c.rank == first ? 0 : 8 + message.size());
  throw Error(static_cast<ErrorKind>(head[0]), "rank " + std::to_string(first) + ": " + message);
}

// K_r^T K_r of the local rows, by the one Gram accumulator (blocks of kGramRows in float64).
std::vector<double> local_gram(ConstMatrix K) {
  const index_t d = K.cols, blocks = (K.rows + detail::kGramRows - 1) / detail::kGramRows;
  return detail::fixed_order_gram(blocks, detail::kGramRows, d, [&](index_t b, double* buf) {
    const index_t r0 = b * detail::kGramRows, rows = std::min(detail::kGramRows, K.rows - r0);
    for (index_t r = 0; r < rows; ++r) std::copy_n(K.row(r0 + r), d, buf + r * d);
    return rows;
  });
}

}  // namespace

Shard shard_of(index_t n, int rank, int size) {
  const index_t p = size, r = rank, base = n / p, extra = n % p;
  return {r * base + std::min(r, extra), base + (r < extra ? 1 : 0)};
}

UniversalSet distributed_universal_set(MPI_Comm comm, ConstMatrix K_local, index_t first, double eps,
                                       const LeverageOptions& options, CommVolume* volume) {
  const Comm c = comm_of(comm, volume);
  // Sizes first: every rank's (first, rows, d), checked the same way everywhere.
  const std::int64_t mine[3] = {first, K_local.rows, K_local.cols};
  std::vector<std::int64_t> all(static_cast<std::size_t>(3 * c.size));
  MPI_Allgather(mine, 3, MPI_INT64_T, all.data(), 3, MPI_INT64_T, comm);
  c.count(24, 24 * static_cast<std::uint64_t>(c.size));
  index_t n = 0, d = 0;
  agree(c, [&] {
    detail::require_eps(eps);
    if (options.method != ScoreMethod::exact) detail::invalid("distributed: the universal set needs exact scores");
    for (int r = 0; r < c.size; ++r) {
      const std::int64_t* s = all.data() + 3 * r;
      if (s[0] != n || s[1] < 0)
        detail::invalid("shards: rank " + std::to_string(r) + " holds rows from " + std::to_string(s[0]) +
                        ", expected " + std::to_string(n) + " (shards contiguous in rank order from row 0)");
      n += s[1];
      if (s[1] > 0) {
        if (d != 0 && s[2] != d) detail::invalid("keys: ranks hold rows of different widths (" + std::to_string(d) +
                                                 " and " + std::to_string(s[2]) + ")");
        d = s[2];
      }
    }
    if (n == 0 || d < 1) detail::invalid("keys: expected a non-empty array across the ranks");
    if (K_local.rows > 0) detail::require_finite_matrix(K_local, "keys");
  });
  // One Allreduce of the local Grams (d^2 float64).
  std::vector<double> M(static_cast<std::size_t>(d * d), 0.0);
  {
    const std::vector<double> local = K_local.rows > 0 ? local_gram(K_local) : std::vector<double>(M.size(), 0.0);
    MPI_Allreduce(local.data(), M.data(), static_cast<int>(M.size()), MPI_DOUBLE, MPI_SUM, comm);
    c.count(8 * M.size(), 8 * M.size());
  }
  UniversalSet local;
  KeyGram g;
  agree(c, [&] {
    g = detail::gram_factor(std::move(M), d, options);
    LeverageScores s;
    if (g.rank == n && g.ridge == 0.0) {  // full row rank: every score is exactly 1, as offline
      s.rank = g.rank, s.sum_bound = static_cast<double>(g.rank);
      s.scores.assign(static_cast<std::size_t>(K_local.rows), 1.0);
    } else {
      s = detail::scores_unchecked(K_local, g, {.rows_of_gram = false});
    }
    local = universal_set(s, eps);
  });
  // The selected (index, score) pairs, in rank order: ascending indices.
  const int count = static_cast<int>(local.indices.size());
  std::vector<int> counts(static_cast<std::size_t>(c.size)), offsets(counts.size() + 1, 0);
  MPI_Allgather(&count, 1, MPI_INT, counts.data(), 1, MPI_INT, comm);
  for (int r = 0; r < c.size; ++r) offsets[r + 1] = offsets[r] + counts[r];
  std::vector<std::int64_t> idx(local.indices.begin(), local.indices.end());
  for (auto& j : idx) j += first;
  UniversalSet out = local;
  std::vector<std::int64_t> gathered(static_cast<std::size_t>(offsets[c.size]));
  out.scores.resize(gathered.size());
  MPI_Allgatherv(idx.data(), count, MPI_INT64_T, gathered.data(), counts.data(), offsets.data(), MPI_INT64_T, comm);
  MPI_Allgatherv(local.scores.data(), count, MPI_DOUBLE, out.scores.data(), counts.data(), offsets.data(), MPI_DOUBLE,
                 comm);
  c.count(4 + 16 * static_cast<std::uint64_t>(count), 4 * static_cast<std::uint64_t>(c.size) + 16 * gathered.size());
  out.indices.assign(gathered.begin(), gathered.end());
  out.n = n;
  const double gam = 1.0 + local.score_rel_error_bound;
  out.size_bound = std::floor(std::min(static_cast<double>(n), static_cast<double>(g.rank) * gam * gam / eps));
  return out;
}

}  // namespace levattn
