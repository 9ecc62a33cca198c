// Timing helpers of the benchmark programs: wall-clock seconds since a point, and the median of
// repeated measurements (the figure every program reports, robust to a noisy shared machine).
#pragma once
#include <algorithm>
#include <chrono>
#include <vector>

namespace levattn::bench {

using Clock = std::chrono::steady_clock;

inline double seconds(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

/// The median of v (the upper one of an even count); v non-empty.
inline double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

}  // namespace levattn::bench
