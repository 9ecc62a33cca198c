// detail/rng.hpp: counter-based random numbers (Random123 Philox4x32-10). A draw is a pure
// function of (seed, stream, counter), so results never depend on thread count or order.
#pragma once
#include <Random123/philox.h>

#include <cstdint>

namespace levattn::detail {

__extension__ typedef unsigned __int128 uint128;

class CounterRng {
 public:
  CounterRng(std::uint64_t seed, std::uint64_t stream) : stream_(stream) {
    key_ = {{static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32)}};
  }
  /// The 64-bit value number `i` of this stream.
  std::uint64_t u64(std::uint64_t i) const {
    r123::Philox4x32::ctr_type c = {{static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(i >> 32),
                                     static_cast<std::uint32_t>(stream_),
                                     static_cast<std::uint32_t>(stream_ >> 32)}};
    const auto r = r123::Philox4x32()(c, key_);
    return (static_cast<std::uint64_t>(r[0]) << 32) | r[1];
  }
  /// Uniform integer in [0, bound) from value `i` (multiply-shift; bias below 2^-40 for
  /// bound < 2^24, negligible for sampling keys).
  std::uint64_t below(std::uint64_t i, std::uint64_t bound) const {
    return static_cast<std::uint64_t>((static_cast<uint128>(u64(i)) * bound) >> 64);
  }
  /// Uniform double in [0, 1) from value `i` (53 random bits).
  double uniform(std::uint64_t i) const { return static_cast<double>(u64(i) >> 11) * 0x1.0p-53; }

 private:
  std::uint64_t stream_;
  r123::Philox4x32::key_type key_;
};

}  // namespace levattn::detail
