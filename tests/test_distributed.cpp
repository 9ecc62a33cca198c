// Distributed universal sets under mpirun -np P: the single-process set of the whole K for
// shards that do not divide n (empty ranks included), communication independent of n, and
// errors on one rank ending the call on every rank with that rank's message.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "levattn/distributed.hpp"
#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::index_t;
using oracle::Mat;

int rank_of() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int size_of() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// This rank's shard of K as a view.
levattn::ConstMatrix my_rows(const Mat& K, levattn::Shard s) { return {K.v.data() + s.first * K.cols, s.rows, K.cols}; }

// Keys with log-normal norms: some keys of high leverage among many of low.
Mat keys(index_t n, index_t d, std::uint64_t seed) {
  Mat k = oracle::gaussian(n, d, seed);
  const Mat s = oracle::gaussian(n, 1, seed + 1);
  for (index_t r = 0; r < n; ++r)
    for (index_t x = 0; x < d; ++x) k(r, x) *= static_cast<float>(std::exp(1.5 * s(r, 0)));
  return k;
}

void expect_single_process_set(const Mat& K, double eps) {
  const levattn::Shard s = levattn::shard_of(K.rows, rank_of(), size_of());
  levattn::CommVolume vol;
  const levattn::UniversalSet mine = levattn::distributed_universal_set(MPI_COMM_WORLD, my_rows(K, s), s.first, eps, {}, &vol);
  const levattn::LeverageScores ref_scores = levattn::leverage_scores(K.view());
  const levattn::UniversalSet ref = levattn::universal_set(ref_scores, eps);
  EXPECT_EQ(mine.n, K.rows);
  EXPECT_EQ(mine.rank, ref.rank);
  // Equal sets, but for keys whose score is within the Gram's rounding of the threshold.
  std::vector<index_t> a = mine.indices, b = ref.indices, diff;
  std::set_symmetric_difference(a.begin(), a.end(), b.begin(), b.end(), std::back_inserter(diff));
  for (index_t j : diff) EXPECT_NEAR(ref_scores.scores[j], eps, 1e-6 * eps) << "key " << j;
  for (std::size_t x = 0; x < mine.indices.size(); ++x)
    EXPECT_NEAR(mine.scores[x], ref_scores.scores[mine.indices[x]], 1e-6 * ref_scores.scores[mine.indices[x]]);
  // Communication: d^2 float64 and the selected pairs, plus O(P) sizes and flags.
  const std::uint64_t d = static_cast<std::uint64_t>(K.cols), P = static_cast<std::uint64_t>(size_of());
  EXPECT_LE(vol.sent, 8 * d * d + 16 * mine.indices.size() + 64);
  EXPECT_LE(vol.received, 8 * d * d + 16 * mine.indices.size() + 64 * P);
}

TEST(Distributed, UniversalSetIsTheSingleProcessSet) {
  expect_single_process_set(keys(2000, 8, 1), 0.05);
  expect_single_process_set(keys(2001, 5, 2), 0.2);     // shards that do not divide n
  expect_single_process_set(keys(3, 8, 3), 0.5);        // n < d: full row rank, ranks without rows
  Mat low(500, 6);                                      // rank 2, repeated keys
  const Mat a = oracle::gaussian(500, 2, 4);
  for (index_t r = 0; r < 500; ++r)
    for (index_t x = 0; x < 6; ++x) low(r, x) = a(r, 0) * (x % 2 ? 1.0f : 0.5f) + a(r, 1) * static_cast<float>(x);
  expect_single_process_set(low, 0.01);
}

TEST(Distributed, StridedKeysAreReadByRow) {
  const Mat K = keys(600, 5, 51);
  const levattn::Shard s = levattn::shard_of(K.rows, rank_of(), size_of());
  std::vector<float> wide(static_cast<std::size_t>(s.rows * 8), -7.0f);  // rows of 8, the keys in the first 5
  for (index_t r = 0; r < s.rows; ++r)
    for (index_t x = 0; x < 5; ++x) wide[r * 8 + x] = K(s.first + r, x);
  const auto got = levattn::distributed_universal_set(MPI_COMM_WORLD, {wide.data(), s.rows, 5, 8}, s.first, 0.05);
  const auto ref = levattn::distributed_universal_set(MPI_COMM_WORLD, my_rows(K, s), s.first, 0.05);
  EXPECT_EQ(got.indices, ref.indices);
}

TEST(Distributed, CommunicationDoesNotGrowWithN) {
  const index_t d = 8;
  levattn::CommVolume small, large;
  for (auto [n, vol] : {std::pair{2000, &small}, std::pair{40000, &large}}) {
    Mat K = oracle::gaussian(n, d, 7, 0.01);
    for (index_t j = 0; j < 16; ++j) K(j * (n / 16), j % d) = 5.0f;  // the same 16 keys are heavy
    const levattn::Shard s = levattn::shard_of(n, rank_of(), size_of());
    const auto u = levattn::distributed_universal_set(MPI_COMM_WORLD, my_rows(K, s), s.first, 0.1, {}, vol);
    EXPECT_EQ(u.indices.size(), 16u);
  }
  EXPECT_EQ(small.sent, large.sent);
  EXPECT_EQ(small.received, large.received);
}

// A stack of `pairs` matrices (pairs x n x cols) and this rank's rows of each, as one local stack.
struct Stack {
  index_t pairs = 1, n = 0, cols = 0;
  std::vector<float> all, mine;
  levattn::Tensor4Ref whole() const { return {all.data(), 1, pairs, n, cols}; }
  levattn::Tensor4Ref local(levattn::Shard s) const { return {mine.data(), 1, pairs, s.rows, cols}; }
};

Stack stack_of(index_t pairs, index_t n, index_t cols, std::uint64_t seed, levattn::Shard s, bool lognormal) {
  Stack t{pairs, n, cols, {}, {}};
  for (index_t h = 0; h < pairs; ++h) {
    const Mat m = lognormal ? keys(n, cols, seed + 10 * h) : oracle::gaussian(n, cols, seed + 10 * h);
    t.all.insert(t.all.end(), m.v.begin(), m.v.end());
    t.mine.insert(t.mine.end(), m.v.begin() + s.first * cols, m.v.begin() + (s.first + s.rows) * cols);
  }
  return t;
}

double rel_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

// Shards of n rows: the balanced split, or (lopsided) rank 0 empty and the rest split among the others.
levattn::Shard shard(index_t n, bool lopsided) {
  if (!lopsided || size_of() == 1) return levattn::shard_of(n, rank_of(), size_of());
  if (rank_of() == 0) return {0, 0};
  return levattn::shard_of(n, rank_of() - 1, size_of() - 1);
}

// distributed_attention on this rank's rows against attention() of the whole arrays, on every rank.
void expect_single_process_attention(const levattn::AttentionOptions& o, index_t m, index_t n, bool lopsided,
                                     levattn::DistributedMode mode = levattn::DistributedMode::exact) {
  const index_t d = 8, dv = 5, pairs = 2;
  const levattn::Shard sq = shard(m, lopsided), sk = shard(n, lopsided);
  const Stack Q = stack_of(pairs, m, d, 11, sq, false), K = stack_of(pairs, n, d, 12, sk, true),
              V = stack_of(pairs, n, dv, 13, sk, false);
  std::vector<float> ref(static_cast<std::size_t>(pairs * m * dv)), out(static_cast<std::size_t>(pairs * sq.rows * dv));
  levattn::attention(Q.whole(), K.whole(), V.whole(), ref.data(), o);
  levattn::CommVolume vol;
  const auto r = levattn::distributed_attention(MPI_COMM_WORLD, Q.local(sq), sq.first, K.local(sk), V.local(sk),
                                                sk.first, out.data(), o, mode, &vol);
  std::vector<float> expect;
  for (index_t h = 0; h < pairs; ++h)
    expect.insert(expect.end(), ref.begin() + (h * m + sq.first) * dv, ref.begin() + (h * m + sq.first + sq.rows) * dv);
  EXPECT_LE(rel_error(out, expect), 1e-6) << "select " << levattn::to_string(o.select) << ", m " << m << ", n " << n;
  EXPECT_EQ(r.shared_sizes.size(), static_cast<std::size_t>(pairs));
  if (size_of() == 1) {
    EXPECT_EQ(vol.sent + vol.received, 0u);
  }
}

TEST(Distributed, AttentionIsTheSingleProcessAttention) {
  levattn::AttentionOptions lev;
  lev.select = levattn::Select::leverage;
  lev.eps = 0.05;
  for (bool lopsided : {false, true}) {
    expect_single_process_attention(lev, 523, 523, lopsided);
    levattn::AttentionOptions both = lev;
    both.window = 4, both.sinks = 3;
    expect_single_process_attention(both, 523, 523, lopsided);
    levattn::AttentionOptions wide;  // a window wider than a shard: the halo crosses ranks
    wide.select = levattn::Select::window, wide.window = 200, wide.sinks = 2;
    expect_single_process_attention(wide, 523, 523, lopsided);
    levattn::AttentionOptions full;  // the ring
    expect_single_process_attention(full, 301, 523, lopsided);
    levattn::AttentionOptions poly = lev;  // power kernel, p 2: the exact mode still applies
    poly.kernel = levattn::Kernel::power, poly.p = 2.0, poly.window = 1;
    expect_single_process_attention(poly, 301, 523, lopsided);
  }
}

TEST(Distributed, TwoRoundsContainTheSingleProcessSet) {
  const index_t n = 777, d = 6;
  const levattn::Shard s = levattn::shard_of(n, rank_of(), size_of());
  const Stack K = stack_of(1, n, d, 21, s, true);
  for (double p : {2.0, 4.0, 1.0}) {
    levattn::UniversalOptions o;
    o.eps = 0.02, o.p = p;
    const levattn::UniversalSet ref = levattn::universal_sets(K.whole(), o).front();
    const levattn::UniversalSet got =
        levattn::distributed_universal_sets(MPI_COMM_WORLD, K.local(s), s.first, o, levattn::DistributedMode::two_round)
            .front();
    EXPECT_TRUE(std::includes(got.indices.begin(), got.indices.end(), ref.indices.begin(), ref.indices.end()))
        << "p " << p << ": " << got.indices.size() << " keys, the single-process set " << ref.indices.size();
    EXPECT_EQ(got.n, n);
  }
}

TEST(Distributed, HeavyEntriesAreTheSingleProcessEntries) {
  for (bool lopsided : {false, true}) {
    const index_t m = 401, n = 613, d = 7;
    const levattn::Shard sq = shard(m, lopsided), sk = shard(n, lopsided);
    const Stack Q = stack_of(2, m, d, 31, sq, false), K = stack_of(2, n, d, 32, sk, true);
    const auto ref = levattn::heavy_entries(Q.whole(), K.whole(), 0.02, levattn::HeavyOptions{});
    const auto mine =
        levattn::distributed_heavy_entries(MPI_COMM_WORLD, Q.local(sq), sq.first, K.local(sk), sk.first, 0.02);
    const auto all = levattn::gather_heavy_entries(MPI_COMM_WORLD, mine, 0);
    if (rank_of() != 0) continue;
    ASSERT_EQ(all.size(), ref.size());
    for (std::size_t h = 0; h < ref.size(); ++h) {
      ASSERT_EQ(all[h].entries.size(), ref[h].entries.size()) << "pair " << h;
      for (std::size_t e = 0; e < ref[h].entries.size(); ++e) {
        EXPECT_EQ(all[h].entries[e].query, ref[h].entries[e].query);
        EXPECT_EQ(all[h].entries[e].key, ref[h].entries[e].key);
        EXPECT_NEAR(all[h].entries[e].value, ref[h].entries[e].value, 1e-9);
      }
    }
  }
}

TEST(Distributed, ShardedNpyWriteIsOneFileWrittenAtomically) {
  const std::string dir = "/tmp/levattn_test_distributed_" + std::to_string(size_of());
  if (rank_of() == 0) std::filesystem::create_directories(dir);
  MPI_Barrier(MPI_COMM_WORLD);
  const index_t n = 211, cols = 3;
  const levattn::Shard s = levattn::shard_of(n, rank_of(), size_of());
  const Stack A = stack_of(2, n, cols, 41, s, false);
  const std::string path = dir + "/A.npy";
  levattn::write_npy_rows(MPI_COMM_WORLD, path, {2, n, cols}, s.first, s.rows, A.mine.data());
  const levattn::Array back = levattn::read_npy(path);
  EXPECT_EQ(back.shape, (std::vector<index_t>{2, n, cols}));
  EXPECT_EQ(back.f32, A.all);
  // A failing write (shards that do not add up to the shape) leaves the old file as it was.
  const auto [kind, what] = oracle::error_of(
      [&] { levattn::write_npy_rows(MPI_COMM_WORLD, path, {2, n + 1, cols}, s.first, s.rows, A.mine.data()); });
  EXPECT_EQ(kind, levattn::ErrorKind::invalid_argument) << what;
  EXPECT_EQ(levattn::read_npy(path).f32, A.all);
  const auto [kind2, what2] = oracle::error_of(
      [&] { levattn::write_npy_rows(MPI_COMM_WORLD, dir + "/no/such/dir/A.npy", {2, n, cols}, s.first, s.rows, A.mine.data()); });
  EXPECT_EQ(kind2, levattn::ErrorKind::io) << what2;
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank_of() == 0) {
    for (const auto& f : std::filesystem::directory_iterator(dir))
      EXPECT_EQ(f.path().filename().string().find(".tmp."), std::string::npos) << f.path();
    std::filesystem::remove_all(dir);
  }
}

TEST(Distributed, AnErrorOnOneRankEndsTheCallOnEveryRank) {
  Mat K = keys(300, 4, 9);
  const int last = size_of() - 1;
  const levattn::Shard s = levattn::shard_of(K.rows, rank_of(), size_of());
  K(s.first + s.rows - 1, 2) = rank_of() == last ? NAN : K(s.first + s.rows - 1, 2);
  const auto [kind, what] = oracle::error_of(
      [&] { levattn::distributed_universal_set(MPI_COMM_WORLD, my_rows(K, s), s.first, 0.1); });
  EXPECT_EQ(kind, levattn::ErrorKind::invalid_argument);
  EXPECT_NE(what.find("rank " + std::to_string(last) + ": keys"), std::string::npos) << what;
  // Shards that do not tile the rows: the last rank claims the wrong first row.
  const Mat good = keys(300, 4, 10);
  const index_t first = rank_of() == last && size_of() > 1 ? s.first + 1 : s.first;
  const auto [kind2, what2] = oracle::error_of(
      [&] { levattn::distributed_universal_set(MPI_COMM_WORLD, my_rows(good, s), first, 0.1); });
  if (size_of() > 1) {
    EXPECT_NE(what2.find("shards"), std::string::npos) << what2;
  } else {
    EXPECT_EQ(what2, "no error");
  }
  EXPECT_NE(oracle::error_of([&] { levattn::distributed_universal_set(MPI_COMM_WORLD, my_rows(good, s), s.first, 0.0); })
                .second.find("eps"),
            std::string::npos);
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (rank_of() != 0) {  // one report: rank 0's (every rank's failures still set its exit code)
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int failed = RUN_ALL_TESTS();
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank_of() == 0 && any && !failed) std::fprintf(stderr, "test_distributed: a rank other than 0 failed\n");
  MPI_Finalize();
  return any ? 1 : 0;
}
