// Distributed LevAttention: universal sets (the key Gram summed by one Allreduce, or two
// composable rounds), heavy entries, attention over the gathered set with a window halo, and the
// dense ring. Errors are agreed on by every rank before any other collective (collective.hpp),
// so no rank waits on one that failed.
#include "levattn/distributed.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "collective.hpp"
#include "detail/gram.hpp"
#include "heavy_search.hpp"
#include "detail/lapack.hpp"
#include "detail/names.hpp"
#include "leverage.hpp"
#include "detail/validate.hpp"
#include "engine.hpp"
#include "levattn/selected_attention.hpp"

namespace levattn {

namespace {

constexpr std::pair<DistributedMode, const char*> kModeNames[] = {{DistributedMode::exact, "exact"},
                                                                  {DistributedMode::two_round, "two_round"}};

}  // namespace

std::string to_string(DistributedMode mode) { return detail::name_of(kModeNames, mode); }
DistributedMode parse_distributed_mode(const std::string& name) { return detail::parse_name(kModeNames, name, "mode"); }

using namespace collective;

namespace {

// K_r^T K_r of the local rows, by the one Gram accumulator (blocks of kGramRows in float64).
std::vector<double> local_gram(ConstMatrix K) {
  const index_t d = K.cols, blocks = (K.rows + detail::kGramRows - 1) / detail::kGramRows;
  return detail::fixed_order_gram(blocks, detail::kGramRows, d, [&](index_t b, double* buf) {
    const index_t r0 = b * detail::kGramRows, rows = std::min(detail::kGramRows, K.rows - r0);
    for (index_t r = 0; r < rows; ++r) std::copy_n(K.row(r0 + r), d, buf + r * d);
    return rows;
  });
}

// The rows of `keys` (global, ascending) that this rank holds, each followed by its value row:
// what every rank contributes to a gather of those rows.
std::vector<float> own_rows(ConstMatrix K, ConstMatrix V, index_t first, const std::vector<index_t>& keys) {
  std::vector<float> out;
  const auto lo = std::lower_bound(keys.begin(), keys.end(), first);
  const auto hi = std::lower_bound(keys.begin(), keys.end(), first + K.rows);
  for (auto it = lo; it != hi; ++it) {
    out.insert(out.end(), K.row(*it - first), K.row(*it - first) + K.cols);
    if (V.cols > 0) out.insert(out.end(), V.row(*it - first), V.row(*it - first) + V.cols);
  }
  return out;
}

// One pair's exact x^2 set: Allreduce of the local Grams, exact local scores, gathered set.
struct ExactSet {
  UniversalSet set;
  KeyGram gram;
};

ExactSet exact_set(const Comm& c, ConstMatrix K, index_t first, index_t n, index_t d, double eps,
                   const LeverageOptions& options) {
  std::vector<double> M(static_cast<std::size_t>(d * d), 0.0);
  {
    const std::vector<double> local = K.rows > 0 ? local_gram(K) : std::vector<double>(M.size(), 0.0);
    MPI_Allreduce(local.data(), M.data(), static_cast<int>(M.size()), MPI_DOUBLE, MPI_SUM, c.comm);
    c.count(8 * M.size(), 8 * M.size());
  }
  ExactSet out;
  UniversalSet local;
  agree(c, [&] {
    out.gram = detail::gram_factor(std::move(M), d, options);
    const KeyGram& g = out.gram;
    LeverageScores s;
    if (g.rank == n && g.ridge == 0.0) {  // full row rank: every score is exactly 1, as offline
      s.rank = g.rank, s.sum_bound = static_cast<double>(g.rank);
      s.scores.assign(static_cast<std::size_t>(K.rows), 1.0);
    } else {
      s = detail::scores_unchecked(K, g, {.rows_of_gram = false});
    }
    local = universal_set(s, eps);
  });
  std::vector<std::int64_t> idx(local.indices.begin(), local.indices.end());
  for (auto& j : idx) j += first;
  const std::vector<std::int64_t> all = all_gather(c, idx, "universal set");
  out.set = local;
  out.set.scores = all_gather(c, local.scores, "universal set");
  out.set.indices.assign(all.begin(), all.end());
  out.set.n = n;
  const double gam = 1.0 + local.score_rel_error_bound;
  out.set.size_bound =
      std::floor(std::min(static_cast<double>(n), static_cast<double>(out.gram.rank) * gam * gam / eps));
  return out;
}

// One pair's composable set: U_eps of each rank's keys, the union's rows gathered, U_eps again
// within the union (math.md 1.7: a superset of the set of all keys).
UniversalSet two_round_set(const Comm& c, ConstMatrix K, index_t first, index_t n, const UniversalOptions& o) {
  const auto set_of = [&](ConstMatrix A) {
    if (A.rows == 0) return UniversalSet{};
    return universal_sets(Tensor4Ref{A.data, 1, 1, A.rows, A.cols}, o).front();
  };
  UniversalSet local;
  agree(c, [&] { local = set_of(K); });
  std::vector<index_t> mine(local.indices.begin(), local.indices.end());
  for (auto& j : mine) j += first;
  const std::vector<float> rows = all_gather(c, own_rows(K, {nullptr, 0, 0}, first, mine), "first round");
  std::vector<std::int64_t> idx(mine.begin(), mine.end());
  const std::vector<std::int64_t> uni = all_gather(c, idx, "first round");
  const index_t u = static_cast<index_t>(uni.size());
  UniversalSet second;
  agree(c, [&] { second = set_of({rows.data(), u, K.cols}); });
  for (auto& j : second.indices) j = uni[static_cast<std::size_t>(j)];
  second.n = n;
  return second;
}

// Whole-array checks made once, inside agree: finite values.
void require_finite(const Tensor4Ref& t, const char* what) {
  if (t.rows > 0) detail::require_finite_matrix({t.data, t.batch * t.heads * t.rows, t.cols}, what);
}

ConstMatrix pair_of(const Tensor4Ref& t, index_t pair) { return {t.data + pair * t.rows * t.cols, t.rows, t.cols}; }

// A rank without rows may pass any width: give its view the array's, so that every rank sizes
// its buffers and messages alike.
Tensor4Ref widened(Tensor4Ref t, const Layout& l) {
  if (t.rows == 0) t.cols = l.cols;
  return t;
}

}  // namespace

Shard shard_of(index_t n, int rank, int size) {
  const index_t p = size, r = rank, base = n / p, extra = n % p;
  return {r * base + std::min(r, extra), base + (r < extra ? 1 : 0)};
}

UniversalSet distributed_universal_set(MPI_Comm comm, ConstMatrix K_local, index_t first, double eps,
                                       const LeverageOptions& options, CommVolume* volume) {
  UniversalOptions o;
  o.eps = eps;
  o.leverage = options;
  std::vector<float> packed;  // a strided view as contiguous rows
  if (K_local.ld != K_local.cols)
    for (index_t r = 0; r < K_local.rows; ++r) packed.insert(packed.end(), K_local.row(r), K_local.row(r) + K_local.cols);
  const float* data = K_local.ld != K_local.cols ? packed.data() : K_local.data;
  return distributed_universal_sets(comm, {data, 1, 1, K_local.rows, K_local.cols}, first, o, DistributedMode::exact,
                                    volume)
      .front();
}

std::vector<UniversalSet> distributed_universal_sets(MPI_Comm comm, const Tensor4Ref& K_local, index_t first,
                                                     const UniversalOptions& options, DistributedMode mode,
                                                     CommVolume* volume) {
  const Comm c = comm_of(comm, volume);
  const Layout l = layout_of(c, first, K_local.rows, K_local.cols, K_local.batch * K_local.heads, "keys");
  const Tensor4Ref K_all = widened(K_local, l);
  agree(c, [&] {
    detail::require_eps(options.eps);
    detail::check_leverage_options(options.leverage);
    LEVATTN_REQUIRE(options.top_k == 0, "distributed", "a universal set by eps (a global top-k is not distributed)");
    LEVATTN_REQUIRE(mode != DistributedMode::exact ||
                        (options.p == 2.0 && options.leverage.method == ScoreMethod::exact),
                    "distributed", "the exact mode is for exact leverage scores (p 2, method exact); use the two-round "
                    "mode (levattn-mpi --rounds 2)");
    require_finite(K_local, "keys");
  });
  std::vector<UniversalSet> out;
  for (index_t h = 0; h < l.pairs; ++h) {
    const ConstMatrix K = pair_of(K_all, h);
    out.push_back(mode == DistributedMode::exact
                      ? exact_set(c, K, first, l.n, l.cols, options.eps, options.leverage).set
                      : two_round_set(c, K, first, l.n, options));
  }
  return out;
}

std::vector<HeavyEntries> distributed_heavy_entries(MPI_Comm comm, const Tensor4Ref& Q_local, index_t q_first,
                                                    const Tensor4Ref& K_local, index_t k_first, double eps,
                                                    CommVolume* volume) {
  const Comm c = comm_of(comm, volume);
  const Layout lq = layout_of(c, q_first, Q_local.rows, Q_local.cols, Q_local.batch * Q_local.heads, "queries");
  const Layout lk = layout_of(c, k_first, K_local.rows, K_local.cols, K_local.batch * K_local.heads, "keys");
  if (lq.pairs != lk.pairs || lq.cols != lk.cols)
    fail_together("queries", "expected the keys' (batch, head) pairs and width " + std::to_string(lk.cols) + ", got " +
                                 std::to_string(lq.pairs) + " pairs of width " + std::to_string(lq.cols));
  agree(c, [&] {
    detail::require_eps(eps);
    require_finite(Q_local, "queries");
    require_finite(K_local, "keys");
  });
  const index_t d = lk.cols;
  const Tensor4Ref Q_all = widened(Q_local, lq), K_all = widened(K_local, lk);
  std::vector<HeavyEntries> out(static_cast<std::size_t>(lk.pairs));
  for (index_t h = 0; h < lk.pairs; ++h) {
    const ConstMatrix K = pair_of(K_all, h);
    const ExactSet e = exact_set(c, K, k_first, lk.n, d, eps, {});
    // Tall-skinny QR across the ranks: R of the stacked R_r, in rank order on every rank.
    std::vector<double> stack = all_gather(c, detail::key_r_factor(K), "R factors");
    std::vector<double> R;
    agree(c, [&] { R = detail::householder_r(stack, static_cast<index_t>(c.size) * d, d); });
    const std::vector<index_t>& U = e.set.indices;
    const std::vector<float> rows = all_gather(c, own_rows(K, {nullptr, 0, 0}, k_first, U), "universal set rows");
    const std::vector<double> KU(rows.begin(), rows.end());
    HeavyEntries& r = out[static_cast<std::size_t>(h)];
    r.universal_size = static_cast<index_t>(U.size());
    r.rank = e.gram.rank;
    r.normaliser = detail::kX2Normaliser;
    agree(c, [&] {
      detail::x2_entries(pair_of(Q_all, h), q_first, R, KU, U, eps, detail::x2_zero_tol(lk.n, d, e.gram.gram), r);
    });
  }
  return out;
}

std::vector<HeavyEntries> gather_heavy_entries(MPI_Comm comm, const std::vector<HeavyEntries>& local, int root,
                                               CommVolume* volume) {
  const Comm c = comm_of(comm, volume);
  std::vector<HeavyEntries> out = local;
  for (HeavyEntries& h : out) {
    // (query, key, value bits) triples and the zero rows, as int64: one Gatherv of each.
    std::vector<std::int64_t> mine;
    for (const HeavyEntry& e : h.entries) {
      std::int64_t bits = 0;
      std::memcpy(&bits, &e.value, sizeof bits);
      mine.insert(mine.end(), {e.query, e.key, bits});
    }
    mine.insert(mine.end(), h.zero_rows.begin(), h.zero_rows.end());
    const std::int64_t sizes[2] = {static_cast<std::int64_t>(mine.size()), static_cast<std::int64_t>(h.entries.size())};
    std::vector<std::int64_t> all_sizes(static_cast<std::size_t>(2 * c.size));
    MPI_Gather(sizes, 2, MPI_INT64_T, all_sizes.data(), 2, MPI_INT64_T, root, comm);
    std::vector<int> counts(static_cast<std::size_t>(c.size)), at(counts.size() + 1, 0);
    std::uint64_t total = 0;
    for (int r = 0; r < c.size; ++r) total += static_cast<std::uint64_t>(all_sizes[2 * r]);
    int ok = c.rank != root || total <= static_cast<std::uint64_t>(INT_MAX) ? 1 : 0, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, comm);
    if (!all_ok) fail_together("heavy entries", "more than one MPI call gathers; write fewer (a larger eps)");
    for (int r = 0; r < c.size; ++r) counts[r] = static_cast<int>(all_sizes[2 * r]), at[r + 1] = at[r] + counts[r];
    std::vector<std::int64_t> all(c.rank == root ? total : 0);
    MPI_Gatherv(mine.data(), static_cast<int>(mine.size()), MPI_INT64_T, all.data(), counts.data(), at.data(),
                MPI_INT64_T, root, comm);
    c.count(c.rank == root ? 0 : 16 + 8 * mine.size(), c.rank == root ? 16 * (c.size - 1) + 8 * (total - mine.size()) : 0);
    h.entries.clear(), h.zero_rows.clear();
    if (c.rank != root) continue;
    for (int r = 0; r < c.size; ++r) {
      const std::int64_t* p = all.data() + at[r];
      const std::int64_t entries = all_sizes[2 * r + 1];
      for (std::int64_t e = 0; e < entries; ++e) {
        double v = 0.0;
        std::memcpy(&v, p + 3 * e + 2, sizeof v);
        h.entries.push_back({p[3 * e], p[3 * e + 1], v});
      }
      h.zero_rows.insert(h.zero_rows.end(), p + 3 * entries, static_cast<const std::int64_t*>(all.data()) + at[r + 1]);
    }
  }
  return out;
}

namespace {

using Clock = std::chrono::steady_clock;

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

void check_attention_options(const AttentionOptions& o, DistributedMode mode) {
  detail::check_attention_options(o);
  detail::check_leverage_options(o.leverage);
  LEVATTN_REQUIRE(o.select == Select::full || o.select == Select::leverage || o.select == Select::window, "select",
                  "distributed attention takes full, leverage or window, got ", to_string(o.select));
  LEVATTN_REQUIRE(!o.causal, "causal", "distributed attention is not causal");
  LEVATTN_REQUIRE(!o.return_selection, "return_selection",
                  "distributed attention does not return its selection (each rank holds part of it)");
  LEVATTN_REQUIRE(!o.key_mask, "key_mask", "distributed attention takes no key mask");
  LEVATTN_REQUIRE(o.residual == 0, "residual", "distributed attention does not sample the rest of the keys");
  LEVATTN_REQUIRE(o.top_k == 0 && o.budget_alpha == 0.0, "top-k",
                  "distributed leverage selects by eps (a global key budget is not distributed)");
  if (o.select == Select::leverage) {
    const bool x2 = o.kernel == Kernel::softmax || o.p == 2.0;
    LEVATTN_REQUIRE(mode != DistributedMode::exact || (x2 && o.leverage.method == ScoreMethod::exact), "distributed",
                    "the exact mode selects by exact leverage scores (softmax or p 2); use the two-round mode "
                    "(levattn-mpi --rounds 2)");
  }
}

// Intervals [lo, hi) of keys one rank needs besides the gathered set: the sinks and the window
// of its queries; merged, ascending.
std::vector<std::pair<index_t, index_t>> needed_ranges(const AttentionOptions& o, Shard q, index_t n) {
  std::vector<std::pair<index_t, index_t>> r;
  if (q.rows == 0) return r;
  if (o.sinks > 0) r.emplace_back(0, std::min(o.sinks, n));
  if (o.window >= 0) {
    const index_t lo = std::max<index_t>(0, q.first - o.window);
    const index_t hi = std::min(n, q.first + q.rows + o.window);
    if (lo < hi) r.emplace_back(lo, hi);
  }
  if (r.size() == 2 && r[1].first <= r[0].second) r = {{0, std::max(r[0].second, r[1].second)}};
  return r;
}

index_t overlap(std::pair<index_t, index_t> a, Shard s) {
  return std::max<index_t>(0, std::min(a.second, s.first + s.rows) - std::max(a.first, s.first));
}

// Rows fetched from other ranks: ascending global indices, each row d + dv wide (key, value).
struct Fetched {
  std::vector<index_t> index;
  std::vector<float> rows;
};

// The key and value rows of the ranges every rank needs that other ranks hold, from them (one
// Alltoallv; a rank's own rows stay where they are).
Fetched fetch_ranges(const Comm& c, ConstMatrix K, ConstMatrix V, const Layout& lk,
                     const std::vector<std::vector<std::pair<index_t, index_t>>>& need) {
  const index_t w = K.cols + V.cols;
  // Every message size follows from the shards and the needs: checked on every rank alike.
  for (int r = 0; r < c.size; ++r) {
    std::uint64_t in = 0, out = 0;
    for (int s = 0; s < c.size; ++s) {
      if (s == r) continue;
      for (const auto& range : need[static_cast<std::size_t>(r)]) in += static_cast<std::uint64_t>(overlap(range, lk.shards[s]));
      for (const auto& range : need[static_cast<std::size_t>(s)]) out += static_cast<std::uint64_t>(overlap(range, lk.shards[r]));
    }
    mpi_count(std::max(in, out) * static_cast<std::uint64_t>(w), "window halo");
  }
  const Shard mine = lk.shards[static_cast<std::size_t>(c.rank)];
  std::vector<int> scount(static_cast<std::size_t>(c.size), 0), rcount(scount), sat(scount), rat(scount);
  std::vector<float> send;
  for (int r = 0; r < c.size; ++r) {
    sat[r] = static_cast<int>(send.size());
    if (r == c.rank) continue;
    for (const auto& range : need[static_cast<std::size_t>(r)]) {
      const index_t lo = std::max(range.first, mine.first), hi = std::min(range.second, mine.first + mine.rows);
      for (index_t j = lo; j < hi; ++j) {
        send.insert(send.end(), K.row(j - mine.first), K.row(j - mine.first) + K.cols);
        send.insert(send.end(), V.row(j - mine.first), V.row(j - mine.first) + V.cols);
      }
    }
    scount[r] = mpi_count(send.size() - static_cast<std::size_t>(sat[r]), "window halo");
  }
  // Ranges ascending and disjoint, shards in rank order: the rows of one sender arrive range by
  // range, ascending; reading the senders' blocks range by range gives ascending indices.
  const auto& own_need = need[static_cast<std::size_t>(c.rank)];
  std::uint64_t total = 0;
  for (int s = 0; s < c.size; ++s) {
    index_t rows = 0;
    if (s != c.rank)
      for (const auto& range : own_need) rows += overlap(range, lk.shards[s]);
    rat[s] = static_cast<int>(total);
    rcount[s] = mpi_count(static_cast<std::uint64_t>(rows * w), "window halo");
    total += static_cast<std::uint64_t>(rcount[s]);
  }
  std::vector<float> recv(static_cast<std::size_t>(mpi_count(total, "window halo")));
  MPI_Alltoallv(send.data(), scount.data(), sat.data(), MPI_FLOAT, recv.data(), rcount.data(), rat.data(), MPI_FLOAT,
                c.comm);
  c.count(4 * send.size(), 4 * recv.size());
  Fetched f;
  f.rows.reserve(recv.size());
  for (std::size_t x = 0; x < own_need.size(); ++x)
    for (int s = 0; s < c.size; ++s) {
      if (s == c.rank) continue;
      const Shard sh = lk.shards[static_cast<std::size_t>(s)];
      index_t skip = 0;
      for (std::size_t y = 0; y < x; ++y) skip += overlap(own_need[y], sh);
      const index_t lo = std::max(own_need[x].first, sh.first), rows = overlap(own_need[x], sh);
      const float* at = recv.data() + rat[s] + skip * w;
      f.rows.insert(f.rows.end(), at, at + rows * w);
      for (index_t j = lo; j < lo + rows; ++j) f.index.push_back(j);
    }
  return f;
}

// The local problem of one pair: the rows of every key this rank's queries attend and a
// Selection over them that reproduces attention()'s. Keys: the window's range [lo, hi) in order,
// then the shared keys (gathered set and sinks) outside it; queries: `pad` = first - lo zero rows
// (their outputs are dropped), then this rank's. A query's band then covers exactly its window
// keys, and where the band reaches past the range it meets shared keys, which it attends anyway.
struct LocalProblem {
  index_t pad = 0;
  std::vector<float> Q, K, V;
  Selection sel;
};

// The keys every query attends: the gathered set and the sinks, ascending.
std::vector<index_t> shared_keys(const std::vector<index_t>& set, index_t sinks, index_t n) {
  std::vector<index_t> shared = set;
  for (index_t j = 0; j < std::min(sinks, n); ++j) shared.push_back(j);
  std::sort(shared.begin(), shared.end());
  shared.erase(std::unique(shared.begin(), shared.end()), shared.end());
  return shared;
}

// Queries per local problem: small enough that its buffers stay in cache-sized pieces and no
// copy of the whole shard is made, large enough to keep both cores busy.
// With a window the block grows to 4 w, so that the w padding rows cost at most a quarter.
constexpr index_t kQueryBlock = 4096;

LocalProblem local_problem(const AttentionOptions& o, Shard q, ConstMatrix Q, ConstMatrix K, ConstMatrix V,
                           index_t k_first, index_t n, const std::vector<index_t>& shared,
                           const std::vector<index_t>& set, const std::vector<float>& set_rows,
                           const Fetched& fetched) {
  const index_t d = K.cols, dv = V.cols;
  const index_t w = d + dv;
  index_t lo = q.first, hi = q.first;  // the window's range (empty without a window)
  if (o.window >= 0 && q.rows > 0)
    lo = std::max<index_t>(0, q.first - o.window), hi = std::min(n, q.first + q.rows + o.window);
  const bool band = lo < hi;  // no key within the window of any of these queries (m > n + w)
  if (!band) lo = hi = q.first;
  std::vector<index_t> keys;
  for (index_t j = lo; j < hi; ++j) keys.push_back(j);
  for (index_t j : shared)
    if (j < lo || j >= hi) keys.push_back(j);
  LocalProblem L;
  const index_t g = static_cast<index_t>(keys.size());
  L.pad = q.first - lo;
  L.K.resize(static_cast<std::size_t>(g * d));
  L.V.resize(static_cast<std::size_t>(g * dv));
  for (index_t a = 0; a < g; ++a) {  // each key from this rank's rows, the fetched ones or the gathered set
    const index_t j = keys[a];
    const float *k = nullptr, *v = nullptr;
    if (j >= k_first && j < k_first + K.rows) {
      k = K.row(j - k_first), v = V.row(j - k_first);
    } else {
      const auto it = std::lower_bound(fetched.index.begin(), fetched.index.end(), j);
      const auto in_set = std::lower_bound(set.begin(), set.end(), j);
      if (it != fetched.index.end() && *it == j) k = fetched.rows.data() + (it - fetched.index.begin()) * w;
      else if (in_set != set.end() && *in_set == j) k = set_rows.data() + (in_set - set.begin()) * w;
      else detail::fail(ErrorKind::internal, "distributed attention", "key ", j, " was not fetched");
      v = k + d;
    }
    std::copy_n(k, d, L.K.data() + a * d);
    std::copy_n(v, dv, L.V.data() + a * dv);
  }
  L.Q.assign(static_cast<std::size_t>((L.pad + q.rows) * d), 0.0f);
  std::copy_n(Q.data, q.rows * d, L.Q.data() + L.pad * d);
  Selection& s = L.sel;
  s.batch = s.heads = 1, s.m = L.pad + q.rows, s.n = g, s.window = band ? o.window : -1;
  s.shared_keys = {{}};
  index_t extra = hi - lo;  // the shared keys outside the range follow it, in the order of `shared`
  for (index_t j : shared) s.shared_keys[0].push_back(j >= lo && j < hi ? j - lo : extra++);
  std::sort(s.shared_keys[0].begin(), s.shared_keys[0].end());
  return L;
}

// Dense attention of this rank's queries as a ring: K, V blocks pass once around the ranks and
// each block's softmax over its keys is merged by log-sum-exp (float64 throughout).
void ring_attention(const Comm& c, ConstMatrix Q, ConstMatrix K, ConstMatrix V, const Layout& lk,
                    const AttentionOptions& o, float* out, index_t& empty) {
  const index_t m = Q.rows, d = Q.cols, dv = V.cols;
  index_t most = 0;
  for (const Shard& s : lk.shards) most = std::max(most, s.rows);
  mpi_count(static_cast<std::uint64_t>(most * (d + dv)), "ring");  // the largest block, on every rank alike
  std::vector<double> q(Q.data, Q.data + m * d), kv(static_cast<std::size_t>(most * (d + dv))), next(kv.size());
  for (index_t r = 0; r < K.rows; ++r) {
    std::copy_n(K.row(r), d, kv.data() + r * d);
    std::copy_n(V.row(r), dv, kv.data() + K.rows * d + r * dv);
  }
  // The rows so far: out and L as the engine writes them (L = +inf: no key with weight yet).
  std::vector<double> acc(static_cast<std::size_t>(m * dv), 0.0), L(static_cast<std::size_t>(m), INFINITY);
  std::vector<double> ob(acc.size()), lb(L.size());
  for (int t = 0; t < c.size; ++t) {
    const int src = (c.rank - t + c.size) % c.size;
    const index_t rows = lk.shards[static_cast<std::size_t>(src)].rows;
    agree(c, [&] {  // every step, on every rank: a failure here ends the ring everywhere
      if (rows == 0 || m == 0) return;
      Selection all;
      all.batch = all.heads = 1, all.m = m, all.n = rows, all.all_keys = true;
      selected_attention_forward<double>({1, 1, m, rows, d, dv}, all, o, q.data(), kv.data(), kv.data() + rows * d,
                                         ob.data(), lb.data());
      engine::merge(m, dv, acc.data(), L.data(), ob.data(), lb.data());
    });
    if (t + 1 == c.size) break;
    const int to = (c.rank + 1) % c.size, from = (c.rank - 1 + c.size) % c.size;
    const index_t send_rows = rows, recv_rows = lk.shards[static_cast<std::size_t>((src - 1 + c.size) % c.size)].rows;
    const int sn = mpi_count(static_cast<std::uint64_t>(send_rows * (d + dv)), "ring");
    const int rn = mpi_count(static_cast<std::uint64_t>(recv_rows * (d + dv)), "ring");
    MPI_Sendrecv(kv.data(), sn, MPI_DOUBLE, to, 0, next.data(), rn, MPI_DOUBLE, from, 0, c.comm, MPI_STATUS_IGNORE);
    c.count(8 * static_cast<std::uint64_t>(sn), 8 * static_cast<std::uint64_t>(rn));
    kv.swap(next);
  }
  agree(c, [&] {
    for (index_t i = 0; i < m; ++i) {
      if (!std::isfinite(L[i])) ++empty;
      for (index_t x = 0; x < dv; ++x) {
        const double v = std::isfinite(L[i]) ? acc[i * dv + x] : 0.0;
        LEVATTN_REQUIRE(!(std::fabs(v) > std::numeric_limits<float>::max()), "values", "the output of query ", i,
                        " overflows float32");
        out[i * dv + x] = static_cast<float>(v);
      }
    }
  });
}

}  // namespace

AttentionResult distributed_attention(MPI_Comm comm, const Tensor4Ref& Q_local, index_t q_first,
                                                 const Tensor4Ref& K_local, const Tensor4Ref& V_local,
                                                 index_t k_first, float* out_local, const AttentionOptions& options,
                                                 DistributedMode mode, CommVolume* volume) {
  const Comm c = comm_of(comm, volume);
  const auto t0 = Clock::now();
  const Layout lq = layout_of(c, q_first, Q_local.rows, Q_local.cols, Q_local.batch * Q_local.heads, "queries");
  const Layout lk = layout_of(c, k_first, K_local.rows, K_local.cols, K_local.batch * K_local.heads, "keys");
  agree(c, [&] {  // before the values' layout, whose tiling check would name the shard, not the cause
    LEVATTN_REQUIRE(V_local.rows == K_local.rows, "values", "expected one row per key: this rank holds ", K_local.rows,
                    " keys and ", V_local.rows, " values");
  });
  const Layout lv = layout_of(c, k_first, V_local.rows, V_local.cols, V_local.batch * V_local.heads, "values");
  if (lq.pairs != lk.pairs || lv.pairs != lk.pairs)
    fail_together("queries, keys, values", "expected the same (batch, head) pairs, got " + std::to_string(lq.pairs) +
                                               ", " + std::to_string(lk.pairs) + " and " + std::to_string(lv.pairs));
  if (lq.cols != lk.cols)
    fail_together("queries", "expected " + std::to_string(lk.cols) + " columns (the keys' dimension), got " +
                                 std::to_string(lq.cols));
  const Tensor4Ref Q_all = widened(Q_local, lq), K_all = widened(K_local, lk), V_all = widened(V_local, lv);
  agree(c, [&] {
    check_attention_options(options, mode);
    require_finite(Q_local, "queries");
    require_finite(K_local, "keys");
    require_finite(V_local, "values");
  });
  const index_t n = lk.n, d = lk.cols, dv = lv.cols, m_r = Q_local.rows;
  const Shard q = lq.shards[static_cast<std::size_t>(c.rank)];
  AttentionResult res;
  double keys_here = 0.0;
  double selection = 0.0;
  for (index_t h = 0; h < lk.pairs; ++h) {
    const ConstMatrix Q = pair_of(Q_all, h), K = pair_of(K_all, h), V = pair_of(V_all, h);
    float* out = out_local + h * m_r * dv;
    if (options.select == Select::full) {
      ring_attention(c, Q, K, V, lk, options, out, res.empty_rows);
      keys_here += static_cast<double>(m_r * n);
      res.shared_sizes.push_back(0);
      continue;
    }
    const auto ts = Clock::now();
    std::vector<index_t> set;
    if (options.select == Select::leverage) {
      UniversalOptions uo;
      uo.eps = options.eps;
      uo.p = options.kernel == Kernel::power ? options.p : 2.0;
      uo.leverage = options.leverage;
      set = mode == DistributedMode::exact ? exact_set(c, K, k_first, n, d, options.eps, options.leverage).set.indices
                                           : two_round_set(c, K, k_first, n, uo).indices;
    }
    const std::vector<float> set_rows = all_gather(c, own_rows(K, V, k_first, set), "selected rows");
    std::vector<std::vector<std::pair<index_t, index_t>>> need;
    for (const Shard& s : lq.shards) need.push_back(needed_ranges(options, s, n));
    const Fetched fetched = fetch_ranges(c, K, V, lk, need);
    selection += since(ts);
    const std::vector<index_t> shared = shared_keys(set, options.sinks, n);
    res.shared_sizes.push_back(static_cast<index_t>(shared.size()));
    // Query blocks of kQueryBlock, each its own small problem (no copy of the whole shard).
    agree(c, [&] {
      LocalProblem L;
      std::vector<float> stat, block_out;
      const index_t block = std::max(kQueryBlock, 4 * options.window);
      for (index_t i0 = 0; i0 < m_r; i0 += block) {
        const Shard b{q.first + i0, std::min(block, m_r - i0)};
        L = local_problem(options, b, {Q.row(i0), b.rows, d}, K, V, k_first, n, shared, set, set_rows, fetched);
        const index_t rows = L.sel.m;
        stat.resize(static_cast<std::size_t>(rows));
        block_out.resize(static_cast<std::size_t>(rows * dv));
        selected_attention_forward<float>({1, 1, rows, L.sel.n, d, dv}, L.sel, options, L.Q.data(), L.K.data(),
                                          L.V.data(), block_out.data(), stat.data());
        std::copy_n(block_out.data() + L.pad * dv, b.rows * dv, out + i0 * dv);
        const std::vector<index_t> per = L.sel.keys_per_query();
        for (index_t i = L.pad; i < rows; ++i) {
          res.empty_rows += stat[static_cast<std::size_t>(i)] == INFINITY ? 1 : 0;
          keys_here += static_cast<double>(per[static_cast<std::size_t>(i)]);
        }
      }
    });
  }
  double sums[2] = {keys_here, static_cast<double>(res.empty_rows)}, total[2] = {0, 0};
  MPI_Allreduce(sums, total, 2, MPI_DOUBLE, MPI_SUM, comm);
  c.count(16, 16);
  res.mean_keys_per_query = total[0] / static_cast<double>(lq.n * lq.pairs);
  res.empty_rows = static_cast<index_t>(total[1]);
  res.seconds_selection = selection;
  res.seconds_attention = since(t0) - selection;
  return res;
}

}  // namespace levattn
