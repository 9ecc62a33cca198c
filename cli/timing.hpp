#pragma once
#include <algorithm>
#include <chrono>
#include <vector>

namespace levattn::cli {

/// Median wall time of `repeats` calls of f, after one untimed call that pays the one-off costs
/// (thread pools, first touch of buffers) a long-running process pays once.
template <class F>
double median_seconds(int repeats, F&& f) {
  f();
  std::vector<double> t;
  for (int r = 0; r < std::max(repeats, 1); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace levattn::cli
