// heavy_search.hpp: the exact x^2 heavy-entry pass against a given key factor, shared by
// heavy_entries and distributed_heavy_entries. Not installed.
#pragma once
#include <cstdint>
#include <vector>

#include "levattn/heavy_entries.hpp"

namespace levattn::detail {

inline constexpr const char* kX2Normaliser = "exact (||R q||^2, K = QR)";

/// The zero threshold of Z_i = ||R q_i||^2 relative to ||q_i||^2 for keys with n rows, d
/// columns and Gram K^T K = gram (d x d; its trace is ||K||_F^2): the rounding of the QR (below
/// it a query counts as orthogonal to every key).
double x2_zero_tol(index_t n, index_t d, const std::vector<double>& gram);

/// Appends to out the entries (query_offset + i, keys[a], (q_i.k_a)^2 / Z_i) >= eps of the
/// queries Q (m x d) against the candidate keys KU (|keys| x d, float64), Z_i = ||R q_i||^2
/// with R (d x d) the keys' QR factor; queries with Z_i <= zero_tol ||q_i||^2 go to zero_rows.
/// Sorted by query, then key (keys ascending). O(m d (d + |keys|)), parallel over query blocks.
void x2_entries(ConstMatrix Q, index_t query_offset, const std::vector<double>& R, const std::vector<double>& KU,
                const std::vector<index_t>& keys, double eps, double zero_tol, HeavyEntries& out);

/// x2_entries through a CountSketch of the candidate keys (HeavySearch::countsketch, header
/// heavy_entries.hpp): the same entries, each found with probability >= 1 - 2^-t; the sketch's
/// hashes from the stream (seed, heavy_countsketch, stream). Sets out's sketch_rows,
/// sketch_buckets and candidates.
void x2_entries_sketched(ConstMatrix Q, const std::vector<double>& R, const std::vector<double>& KU,
                         const std::vector<index_t>& keys, double eps, double zero_tol, double delta,
                         std::uint64_t seed, std::uint64_t stream, HeavyEntries& out);

}  // namespace levattn::detail
