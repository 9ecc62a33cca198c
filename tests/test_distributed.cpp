// Distributed universal sets under mpirun -np P: the single-process set of the whole K for
// shards that do not divide n (empty ranks included), communication independent of n, and
// errors on one rank ending the call on every rank with that rank's message.
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>

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
