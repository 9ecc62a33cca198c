// detail/gram.hpp: the one Gram accumulator: G = sum_b Y_b^T Y_b over blocks of rows, in float64,
// with the same bits for any thread count.
#pragma once
#include <algorithm>
#include <memory>
#include <vector>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "kernels/elementwise.hpp"

namespace levattn::detail {

/// At most this many partial sums (and at most 256 MiB of them); depends on (blocks, d) only.
inline index_t gram_partials(index_t blocks, index_t d) {
  const index_t by_memory = std::max<index_t>(1, (index_t{256} << 20) / (8 * d * d));
  return std::min({index_t{16}, blocks, by_memory});
}

/// sum_p part[p] for `partials` upper-triangular d x d blocks stored one after another, added in
/// index order, returned as a full symmetric d x d row-major matrix.
inline std::vector<double> sum_partial_grams(const double* part, index_t partials, index_t d) {
  std::vector<double> out(static_cast<std::size_t>(d * d), 0.0);
  for (index_t p = 0; p < partials; ++p)
    for (index_t i = 0; i < d; ++i)
      for (index_t j = i; j < d; ++j) out[i * d + j] += part[(p * d + i) * d + j];
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < i; ++j) out[i * d + j] = out[j * d + i];
  return out;
}

/// Copies the upper triangle of the d x d matrix a into its lower triangle.
inline void symmetrize_upper(std::vector<double>& a, index_t d) {
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < i; ++j) a[i * d + j] = a[j * d + i];
}

/// G = sum_b Y_b^T Y_b (d x d, float64, symmetric) where fill(b, buf) writes block b's rows
/// (at most max_rows x d, row-major) into buf and returns how many it wrote, for b in [0, blocks).
/// Block b goes to partial sum b % P (P = gram_partials) by DSYRK and the partials are added in
/// index order, so the rounding is a function of the blocks alone, never of the schedule.
/// `flops_per_block` sizes the team (detail::worth_parallel). fill runs concurrently on distinct
/// blocks, each thread with its own buffer. O(blocks * max_rows * d^2) time, O(P d^2) memory.
template <class Fill>
std::vector<double> fixed_order_gram(index_t blocks, index_t max_rows, index_t d, Fill&& fill) {
  // A few d x d float64 matrices (partials, sum, factor) must fit before anything is formed.
  checked_allocation({d, d, 4}, sizeof(double), "the d x d float64 Gram matrix");
  if (blocks <= 0) return std::vector<double>(static_cast<std::size_t>(d * d), 0.0);
  const index_t partials = gram_partials(blocks, d);
  // Uninitialised: each partial's first DSYRK runs with beta = 0.
  std::unique_ptr<double[]> part(new double[static_cast<std::size_t>(partials * d * d)]);
  const double flops = static_cast<double>(blocks) * static_cast<double>(max_rows) * static_cast<double>(d * d);
  // A small d: the register-blocked kernel of the CPU's instruction set (DSYRK's set-up costs more
  // than its arithmetic there); the same order of summation, so the same bits for any schedule.
  const kernels::RowOps& ops = kernels::active_row_ops();
  const bool small = d <= kernels::kSmallGram;
  parallel_tasks(
      partials, flops, [&] { return std::vector<double>(static_cast<std::size_t>(max_rows * d)); },
      [&](index_t p, std::vector<double>& buf) {
        double* C = part.get() + p * d * d;
        bool first = true;
        for (index_t b = p; b < blocks; b += partials) {
          const index_t rows = fill(b, buf.data());
          if (small) ops.gram_update(rows, d, buf.data(), first ? 0.0 : 1.0, C);
          else dsyrk_ata(d, rows, buf.data(), d, first ? 0.0 : 1.0, C);
          first = false;
        }
      });
  return sum_partial_grams(part.get(), partials, d);
}

}  // namespace levattn::detail
