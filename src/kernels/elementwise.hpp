// kernels/elementwise.hpp: the vectorised row operations of the attention kernels, compiled once
// per instruction set (AVX-512, AVX2+FMA, portable baseline) and chosen at run time (isa.hpp).
// Every path computes the same formulas; they differ only in the order of the sums.
#pragma once
#include "kernels/isa.hpp"
#include "levattn/matrix.hpp"

namespace levattn::kernels {

/// The row operations of one instruction set.
struct RowOps {
  Isa isa = Isa::baseline;
  /// max_j x[j] over x[0 .. n); -inf for n == 0.
  float (*row_max)(const float* x, index_t n) = nullptr;
  /// x[j] <- exp(x[j] - shift) (0 where x[j] - shift < -87, -inf masks included), returns the sum.
  /// For x[j] <= shift (finite), the relative error of each exp is below 2e-7.
  float (*exp_shift_sum)(float* x, index_t n, float shift) = nullptr;
  /// x[j] <- |x[j]| (masked entries, marked -inf, become -1), returns the maximum (-1 if all masked).
  float (*abs_row_max)(float* x, index_t n) = nullptr;
  /// x[j] <- (x[j] / m)^p for x[j] >= 0 and 0 for the -1 mask, returns the sum. m > 0, p > 0.
  float (*power_rel_sum)(float* x, index_t n, float m, float p) = nullptr;
  /// The online-softmax update of a tile of rows x c logits (leading dimension c): per row, the
  /// running maximum m[r] and normaliser l[r] absorb the tile, the tile is replaced by its
  /// weights exp(s - m_new) (0 for rows that are entirely masked with -inf), and the accumulator
  /// row acc[r] (dv wide) is rescaled by exp(m_old - m_new). Returns whether any row had a key.
  bool (*softmax_update)(float* tile, index_t rows, index_t c, float* m, double* l, float* acc,
                         index_t dv) = nullptr;
  /// The number of j with x[j] >= t (x without NaN).
  index_t (*count_at_least)(const float* x, index_t n, float t) = nullptr;
  /// The x[j] with lo <= x[j] < hi, in order, into out (room for n); returns how many.
  index_t (*collect_between)(const float* x, index_t n, float lo, float hi, float* out) = nullptr;
  /// The j with x[j] > t, ascending, into out (room for n); returns how many (x without NaN).
  index_t (*indices_above)(const float* x, index_t n, float t, index_t* out) = nullptr;
  /// acc[x] += sum_a w[a] rows[idx[a] ld + x] for x < dv: m gathered rows, weighted, each
  /// output summed over a in order.
  void (*gathered_weighted_sum)(const float* w, const index_t* idx, index_t m, const float* rows, index_t ld,
                                index_t dv, float* acc) = nullptr;
  /// One row of the backward's block: from the logits s[j] (-inf where masked), the row's
  /// log-normaliser L and delta = dout . out, p[j] <- P = exp(g(s) - L) and dp[j] (dout . v_j on
  /// entry) <- dS = P g'(s) (dp[j] - delta). Softmax (power == 0): g(s) = s; the power kernel
  /// (power = its p > 0): g(s) = p log|s|, so P = (|s| / exp(L / p))^p and dS = p P / s (...),
  /// 0 at s = 0. p may alias s.
  void (*weight_grads)(const float* s, float* p, float* dp, index_t n, float L, float power, float delta) = nullptr;
  /// out[a] = alpha sum_x x[x] rows[idx[a] ld + x] for a < m, x < d: dot products with m
  /// gathered rows (a query with its own keys).
  void (*gathered_dots)(const float* x, const index_t* idx, index_t m, const float* rows, index_t ld, index_t d,
                        float alpha, float* out) = nullptr;
  /// rows[idx[a] ld + x] += w[a] y[x] for a < m, x < d (idx distinct): y added, scaled, to m
  /// gathered rows (a query's share of its own keys' gradients).
  void (*scatter_scaled)(const float* w, const index_t* idx, index_t m, const float* y, float* rows, index_t ld,
                         index_t d) = nullptr;
  /// max_j |x[j]|, or -1 if an entry is NaN or Inf: the input check of every entry point.
  float (*max_abs)(const float* x, index_t n) = nullptr;
  /// y[j] = x[j] in float64 for j < n; returns whether every x[j] is finite.
  bool (*widen)(const float* x, index_t n, double* y) = nullptr;
  /// The first j of [0, n) with the largest x[j] - shift[j] (0 if all are -inf; x, shift without NaN).
  index_t (*argmax_shifted)(const float* x, const float* shift, index_t n) = nullptr;

  // Products of one query block with a narrow tile of keys (count <= kNarrowTile), where a BLAS
  // call costs more in set-up than in arithmetic (a few hundred keys per head).
  /// C (rows x count, ldc) = alpha A (rows x d, lda) Bt, with Bt (d x count, row-major, leading
  /// dimension count) the tile's keys transposed.
  void (*narrow_logits)(index_t rows, index_t count, index_t d, float alpha, const float* A,
                        index_t lda, const float* Bt, float* C, index_t ldc) = nullptr;
  /// C (rows x dv, ldc) += P (rows x count, ldp) V (count x dv, ldv).
  void (*narrow_weighted_sum)(index_t rows, index_t count, index_t dv, const float* P, index_t ldp,
                              const float* V, index_t ldv, float* C, index_t ldc) = nullptr;
  /// C <- beta C + Y^T Y for Y (rows x d, row-major, float64) and C (d x d, row-major; the upper
  /// triangle, diagonal included, is written), d <= kSmallGram, beta 0 or 1: DSYRK for a small d,
  /// each entry summed over the rows in order.
  void (*gram_update)(index_t rows, index_t d, const double* Y, double beta, double* C) = nullptr;
};

/// The widest key tile the narrow products take.
inline constexpr index_t kNarrowTile = 64;

/// The largest d for which the small Gram update (RowOps::gram_update) and the narrow score
/// product replace DSYRK and STRMM: above it the BLAS wins at every n.
inline constexpr index_t kSmallGram = 32;

/// The operations of `isa`. Throws Error(invalid_argument) if this build or CPU lacks it.
const RowOps& row_ops(Isa isa);

/// The operations of active_isa() (LEVATTN_ISA, else the best the CPU has).
const RowOps& active_row_ops();

// One table per instruction set, each defined in its own translation unit (elementwise_*.cpp).
const RowOps& row_ops_baseline();
#if LEVATTN_X86_KERNELS
const RowOps& row_ops_avx2();
const RowOps& row_ops_avx512();
#endif

}  // namespace levattn::kernels
