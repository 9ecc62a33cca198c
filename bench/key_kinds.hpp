// bench/key_kinds.hpp: the key distributions the causal and decoding benchmarks run on.
#pragma once
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "levattn/matrix.hpp"

namespace bench {

using levattn::index_t;

// n x d keys: "gaussian" N(0, 1); "spiky": N(0, 0.05^2) with one key in 256 carrying a large
// entry in one of d directions; "lognormal": Gaussian directions with log-normal norms (sigma 1),
// whose large keys keep high prefix scores.
inline std::vector<float> make_keys(const std::string& kind, index_t n, index_t d, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> k(static_cast<std::size_t>(n * d));
  for (index_t i = 0; i < n; ++i) {
    const float norm = kind == "lognormal" ? std::exp(nd(g)) : kind == "spiky" ? 0.05f : 1.0f;
    for (index_t x = 0; x < d; ++x) k[i * d + x] = norm * nd(g);
    if (kind == "spiky" && i % 256 == 0) k[i * d + (i / 256) % d] += 8.0f;
  }
  return k;
}

}  // namespace bench
