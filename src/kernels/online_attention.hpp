// kernels/online_attention.hpp: attention of a block of query rows over a sequence of key tiles,
// with the row normaliser kept online (running maximum, rescaled partial sums), so no buffer
// larger than one block x tile is ever held. The float32 attention engine (every selection, the
// dense reference included) runs on it.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/elementwise.hpp"
#include "levattn/kernel.hpp"

namespace levattn::kernels {

struct KernelParams {
  Kernel kernel = Kernel::softmax;
  float scale = 1.0f;
  float p = 2.0f;
  /// Check every logit tile for overflow; the driver clears it when Cauchy-Schwarz shows that
  /// |scale q.k| <= |scale| max|q| max|k| cannot overflow.
  bool check_overflow = true;
  /// The row operations of the instruction set in use (active_row_ops() unless a test picks one).
  const RowOps* ops = nullptr;
  /// bfloat16 products (kernels/bf16.hpp) for tiles of more than kNarrowTile keys; set only
  /// where bf16_available().
  bool bf16 = false;
};

/// Per-thread state for one block of up to `rows` queries.
class OnlineBlock {
 public:
  OnlineBlock(const KernelParams& params, index_t max_rows, index_t max_tile, index_t dv);

  /// Starts a block of `rows` queries (rows x d at q with leading dimension ldq).
  void begin(const float* q, index_t ldq, index_t rows, index_t d);

  /// Logits of the block against `count` keys (count x d at k, leading dimension ldk) into the
  /// tile buffer; returns it (rows x count, leading dimension count) so the caller can mask
  /// entries by writing -inf.
  float* logits(const float* k, index_t ldk, index_t count);

  /// Folds the tile last returned by logits() into the running sums, with values v (count x dv).
  void absorb(const float* v, index_t ldv, index_t count);

  /// Multiplies every kernel value of the current tile (from logits()) by exp(log_weight): its
  /// logits shifted by log_weight (softmax) or scaled by exp(log_weight / p) (the power kernel);
  /// masked entries stay masked. Sampled keys' weight (Selection::residual_weight).
  void weigh(float log_weight);

  /// Folds keys keys[0 .. count) (rows of k and v, leading dimensions ldk and ldv; none masked)
  /// into row r alone: a query's own keys (topk, cluster), which no other row of the block
  /// attends. Reads the rows in place (no gathered copy); any count (tiles of max_tile).
  void absorb_row(index_t r, const float* k, index_t ldk, const float* v, index_t ldv, const index_t* keys,
                  index_t count);

  /// Rows of a finished block: with no key or a zero normaliser (written as 0), and not finite
  /// (a logit or the weighted sum of values overflowed float32; written as NaN, for the caller
  /// to report).
  struct Rows {
    index_t empty = 0, non_finite = 0;
  };

  /// Writes O_r = acc_r / l_r to out (rows x dv, leading dimension ldo) and counts its rows;
  /// with stat (rows entries), also the row statistic L_r = log sum_j exp(g(s_rj)) of
  /// selected_attention_forward (+inf for an empty row, NaN for a non-finite one).
  Rows finish(float* out, index_t ldo, float* stat = nullptr);

  /// Whether logits() checks its tiles for overflow (see KernelParams::check_overflow).
  void set_check_overflow(bool check) { params_.check_overflow = check; }

 private:
  KernelParams params_;
  index_t max_rows_, max_tile_, dv_;
  const float* q_ = nullptr;
  index_t ldq_ = 0, rows_ = 0, d_ = 0, count_ = 0;
  bool overflow_ = false;  // a logit overflowed float32 (-inf would read as a mask)
  // Uninitialised storage: every element is written before it is read, and zero-filling
  // hundreds of KiB per call shows up in profiles.
  std::unique_ptr<float[]> tile_, acc_, max_;
  std::unique_ptr<double[]> sum_;
  std::vector<float> keys_t_;  // a narrow tile's keys, transposed (d x count)
  // bfloat16 pairs (params_.bf16): the block's queries (rows x d/2), a tile's keys (d/2 x
  // count), its weights (rows x count/2) and its values (count/2 x dv).
  std::vector<std::uint32_t> q16_, k16_, p16_, v16_;

  // The power kernel's update of row r by its tile row s (c logits): running max |s| and the
  // rescaled sum; returns whether the row had a key.
  bool power_update(index_t r, float* s, index_t c);
};

/// Tile width used over keys.
inline constexpr index_t kKeyTile = 512;
/// Queries per block.
inline constexpr index_t kQueryBlock = 256;

}  // namespace levattn::kernels
