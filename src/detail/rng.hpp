// detail/rng.hpp: the one random number generator of the library (Random123 Philox4x32-10,
// counter-based). Every random draw is a pure function of (seed, purpose, index, draw number):
// the seed is the Philox key; purpose, index and draw number make up the counter, so streams of
// different purposes or indices never share a counter and are independent whatever the seeds,
// the thread count or the order of the draws.
#pragma once
#include <Random123/philox.h>

#include <cmath>
#include <cstdint>

#include "detail/require.hpp"

namespace levattn::detail {

__extension__ typedef unsigned __int128 uint128;

/// The registry: one value per kind of random quantity in the library. Never reuse a value.
enum class Purpose : std::uint32_t {
  planted_noise = 1,   ///< planted(): noise keys
  planted_positions,   ///< planted(): positions of the relevant keys
  planted_directions,  ///< planted(): their directions
  planted_queries,     ///< planted(): query noise
  planted_values,      ///< planted(): values
  planted_targets,     ///< planted(): each query's relevant key
  random_selection,    ///< attention Select::random, index = (batch, head) pair
  sampled_normaliser,  ///< heavy_entries with sampled normalisers
  jl_projection,       ///< sketched leverage scores: the JL matrix
  countsketch,         ///< bucket and sign of each input row
  gaussian_sketch,     ///< entries of a Gaussian sketch
  srht_signs,          ///< the diagonal D of an SRHT
  srht_rows,           ///< the rows P an SRHT keeps
  cluster_seeds,       ///< attention Select::cluster: initial centroids, index = (batch, head) pair
  cluster_sample,      ///< attention Select::cluster: the keys k-means trains on, index = pair
  heavy_countsketch,   ///< heavy_entries search countsketch: bucket and sign of each key of U per
                       ///< row, index = (batch, head) pair
  residual_sample,     ///< sample_residual: the keys a block of queries draws from its rest, index = pair *
                       ///< residual blocks + block
};

class CounterRng {
 public:
  /// The stream of (seed, purpose, index); index < 2^56.
  CounterRng(std::uint64_t seed, Purpose purpose, std::uint64_t index = 0) {
    if (index >> 56) fail(ErrorKind::internal, "CounterRng", "stream index out of range");
    key_ = {{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
    c2_ = static_cast<std::uint32_t>(index);
    c3_ = static_cast<std::uint32_t>(index >> 32) | (static_cast<std::uint32_t>(purpose) << 24);
  }
  /// The four 32-bit values of block `i` of this stream (u64(i) is the first two).
  r123::Philox4x32::ctr_type block(std::uint64_t i) const {
    const r123::Philox4x32::ctr_type c = {
        {static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(i >> 32), c2_, c3_}};
    return r123::Philox4x32()(c, key_);
  }
  /// The 64-bit value number `i` of this stream.
  std::uint64_t u64(std::uint64_t i) const {
    const auto r = block(i);
    return (static_cast<std::uint64_t>(r[0]) << 32) | r[1];
  }
  /// Uniform integer in [0, bound) from value `i` (multiply-shift; bias below bound / 2^64).
  std::uint64_t below(std::uint64_t i, std::uint64_t bound) const {
    return static_cast<std::uint64_t>((static_cast<uint128>(u64(i)) * bound) >> 64);
  }
  /// Uniform double in [0, 1) from value `i` (53 random bits).
  double uniform(std::uint64_t i) const { return static_cast<double>(u64(i) >> 11) * 0x1.0p-53; }
  /// Standard normal number `i` (Box-Muller on values 2i and 2i + 1).
  double normal(std::uint64_t i) const {
    const double u1 = 1.0 - uniform(2 * i), u2 = uniform(2 * i + 1);
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

 private:
  r123::Philox4x32::key_type key_;
  std::uint32_t c2_ = 0, c3_ = 0;
};

/// A stream's 32-bit values in order (four per Philox block), and exactly uniform integers below
/// a bound from them (Lemire's multiply-shift, rejecting the 2^32 mod bound low products that
/// would bias it): the cheap draws of a sampler that needs many small integers.
class Draws {
 public:
  explicit Draws(const CounterRng& rng) : rng_(rng) {}
  std::uint32_t next() {
    if (used_ == 4) block_ = rng_.block(blocks_++), used_ = 0;
    return block_[used_++];
  }
  /// Uniform in [0, bound), 1 <= bound < 2^32.
  std::uint32_t below(std::uint32_t bound) {
    std::uint64_t m = static_cast<std::uint64_t>(next()) * bound;
    if (static_cast<std::uint32_t>(m) < bound) {
      const std::uint32_t reject = static_cast<std::uint32_t>(-bound) % bound;  // 2^32 mod bound
      while (static_cast<std::uint32_t>(m) < reject) m = static_cast<std::uint64_t>(next()) * bound;
    }
    return static_cast<std::uint32_t>(m >> 32);
  }

 private:
  const CounterRng& rng_;
  r123::Philox4x32::ctr_type block_{};
  std::uint64_t blocks_ = 0;
  int used_ = 4;
};

}  // namespace levattn::detail
