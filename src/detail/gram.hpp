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

/// Rows per block of the key Gram (key_gram and GramStream): part of what fixes its rounding.
inline constexpr index_t kGramRows = 1024;

/// The partial sums a Gram uses at most: 16, and at most 256 MiB of them; depends on d only.
inline index_t gram_partials(index_t d) {
  return std::min<index_t>(16, std::max<index_t>(1, (index_t{256} << 20) / (8 * d * d)));
}
/// The partial sums for `blocks` blocks: block b goes to partial b % gram_partials(d), so the
/// first min(blocks, gram_partials(d)) are used.
inline index_t gram_partials(index_t blocks, index_t d) { return std::min(blocks, gram_partials(d)); }

/// C <- Y^T Y (first) or C + Y^T Y: one block's contribution to its partial sum (upper triangle),
/// by the register-blocked kernel for a small d, else DSYRK.
inline void gram_block(index_t rows, index_t d, const double* Y, bool first, double* C) {
  if (d <= kernels::kSmallGram) kernels::active_row_ops().gram_update(rows, d, Y, first ? 0.0 : 1.0, C);
  else dsyrk_ata(d, rows, Y, d, first ? 0.0 : 1.0, C);
}

/// sum_p part[p] for `partials` upper-triangular d x d blocks stored one after another, added in
/// index order, returned as a full symmetric d x d row-major matrix. With `instead`, partial
/// number `replaced` is read from there.
inline std::vector<double> sum_partial_grams(const double* part, index_t partials, index_t d, index_t replaced = -1,
                                             const double* instead = nullptr) {
  std::vector<double> out(static_cast<std::size_t>(d * d), 0.0);
  for (index_t p = 0; p < partials; ++p) {
    const double* src = p == replaced ? instead : part + p * d * d;
    for (index_t i = 0; i < d; ++i)
      for (index_t j = i; j < d; ++j) out[i * d + j] += src[i * d + j];
  }
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
  parallel_tasks(
      partials, flops, [&] { return std::vector<double>(static_cast<std::size_t>(max_rows * d)); },
      [&](index_t p, std::vector<double>& buf) {
        double* C = part.get() + p * d * d;
        for (index_t b = p; b < blocks; b += partials) gram_block(fill(b, buf.data()), d, buf.data(), b == p, C);
      });
  return sum_partial_grams(part.get(), partials, d);
}

/// K^T K of rows that arrive in pieces of any size, with the bits fixed_order_gram gives for all
/// the rows so far in blocks of kGramRows (what key_gram computes): full blocks go to their
/// partial sums as they complete; the rows of an incomplete block wait (at most kGramRows x d).
/// The state is plain data so that it can be saved: `blocks` full blocks added, `part`
/// gram_partials(d) x d x d partial sums (upper triangles), `pending` the waiting rows.
/// O(d^2 gram_partials(d) + kGramRows d) memory, O(d^2) time per row.
struct GramStream {
  index_t d = 0, blocks = 0;
  std::vector<double> part;
  std::vector<float> pending;

  /// Allocates everything add() uses up front, so that add() cannot fail half way.
  explicit GramStream(index_t dim = 0)
      : d(dim), part(static_cast<std::size_t>(dim > 0 ? gram_partials(dim) * dim * dim : 0), 0.0) {
    pending.reserve(static_cast<std::size_t>(kGramRows * d));
    y_.reserve(pending.capacity());
  }

  index_t partials() const { return static_cast<index_t>(part.size()) / std::max<index_t>(1, d * d); }

  /// Appends rows (rows x d, row-major, finite: the caller checks).
  void add(const float* x, index_t rows) {
    if (!pending.empty()) {  // complete the waiting block first
      const index_t take = std::min(rows, kGramRows - static_cast<index_t>(pending.size()) / d);
      pending.insert(pending.end(), x, x + take * d);
      x += take * d, rows -= take;
      if (static_cast<index_t>(pending.size()) < kGramRows * d) return;
      y_.assign(pending.begin(), pending.end());
      gram_block(kGramRows, d, y_.data(), blocks < partials(), part.data() + (blocks % partials()) * d * d);
      ++blocks;
      pending.clear();
    }
    add_full_blocks(x, rows / kGramRows);
    x += (rows / kGramRows) * kGramRows * d;
    pending.assign(x, x + (rows % kGramRows) * d);
  }

  /// M = K^T K over every row added (d x d, symmetric).
  std::vector<double> gram() const {
    if (blocks == 0 && pending.empty()) return std::vector<double>(static_cast<std::size_t>(d * d), 0.0);
    if (pending.empty()) return sum_partial_grams(part.data(), std::min(blocks, partials()), d);
    // The waiting rows as the next block, into a copy of its partial sum alone.
    const index_t P = partials(), target = blocks % P;
    std::vector<double> one(part.begin() + target * d * d, part.begin() + (target + 1) * d * d), y(pending.begin(), pending.end());
    gram_block(static_cast<index_t>(pending.size()) / d, d, y.data(), blocks < P, one.data());
    return sum_partial_grams(part.data(), std::min(blocks + 1, P), d, target, one.data());
  }

 private:
  // `count` consecutive full blocks at x: consecutive blocks go to distinct partial sums, so
  // each partial takes its blocks in order on one thread, as in fixed_order_gram.
  void add_full_blocks(const float* x, index_t count) {
    if (count == 0) return;
    const index_t P = partials(), b0 = blocks;
    const double flops = static_cast<double>(count * kGramRows) * static_cast<double>(d * d);
    // One conversion buffer per thread, allocated before any partial sum changes (so that a
    // failed allocation leaves the state as it was) and kept for the next call.
    const bool team = std::min(P, count) > 1 && worth_parallel(flops);
    const auto threads = static_cast<std::size_t>(team ? omp_get_max_threads() : 1);
    if (ys_.size() < threads) ys_.resize(threads);
    for (std::size_t t = 0; t < threads; ++t) ys_[t].reserve(static_cast<std::size_t>(kGramRows * d));
    parallel_tasks(std::min(P, count), flops, [] { return 0; }, [&](index_t t, int&) {
      std::vector<double>& y = ys_[team ? static_cast<std::size_t>(omp_get_thread_num()) : 0];
      for (index_t c = t; c < count; c += P) {
        const float* rows = x + c * kGramRows * d;
        y.assign(rows, rows + kGramRows * d);
        const index_t b = b0 + c;
        gram_block(kGramRows, d, y.data(), b < P, part.data() + (b % P) * d * d);
      }
    });
    blocks += count;
  }

  std::vector<double> y_;
  std::vector<std::vector<double>> ys_;  // add_full_blocks: one per thread

 public:
  /// Bytes of the conversion buffers.
  std::size_t buffer_bytes() const {
    std::size_t b = y_.capacity();
    for (const auto& y : ys_) b += y.capacity();
    return b * sizeof(double);
  }
};

}  // namespace levattn::detail
