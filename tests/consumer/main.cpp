// The package consumer: leverage scores of a small rank-deficient matrix (they must sum to its
// rank), then an .npz round trip, which needs the archive library in the link interface.
// Usage: levattn_consumer SCRATCH_DIR. Exit status 0 when every check holds.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "levattn/levattn.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SCRATCH_DIR\n", argv[0]);
    return 2;
  }
  try {
    // 6 x 3, the third column the sum of the first two: rank 2.
    const std::vector<float> k = {1, 0, 1, 0, 1, 1, 2, 1, 3, 1, 3, 4, 0.5f, -1, -0.5f, -2, 1, -1};
    const levattn::LeverageScores s =
        levattn::leverage_scores(levattn::ConstMatrix(k.data(), 6, 3));
    double sum = 0;
    for (const double t : s.scores) sum += t;
    std::printf("rank %lld, sum of scores %.12f\n", static_cast<long long>(s.rank), sum);
    if (s.rank != 2 || s.scores.size() != 6 || std::fabs(sum - 2.0) > 1e-6) {
      std::fprintf(stderr, "levattn_consumer: the scores do not sum to the rank 2\n");
      return 1;
    }

    const std::filesystem::path npz = std::filesystem::path(argv[1]) / "scores.npz";
    levattn::write_npz(npz, {{"scores", levattn::Array::from_float64({6}, s.scores)}});
    const auto back = levattn::read_npz(npz);
    if (back.size() != 1 || back[0].first != "scores" || back[0].second.f64 != s.scores) {
      std::fprintf(stderr, "levattn_consumer: the .npz round trip changed the scores\n");
      return 1;
    }
  } catch (const levattn::Error& e) {
    std::fprintf(stderr, "levattn_consumer: %s\n", e.what());
    return 1;
  }
  std::printf("levattn_consumer: ok\n");
  return 0;
}
