#include "kernels/online_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "detail/blas.hpp"
#include "detail/validate.hpp"
#include "kernels/bf16.hpp"
#include "levattn/error.hpp"

namespace levattn::kernels {

OnlineBlock::OnlineBlock(const KernelParams& params, index_t max_rows, index_t max_tile,
                         index_t dv)
    : params_(params),
      max_rows_(max_rows),
      max_tile_(max_tile),
      dv_(dv),
      tile_(new float[static_cast<std::size_t>(max_rows * max_tile)]),
      acc_(new float[static_cast<std::size_t>(max_rows * dv)]),
      max_(new float[static_cast<std::size_t>(max_rows)]),
      sum_(new double[static_cast<std::size_t>(max_rows)]) {
  if (params_.ops == nullptr) params_.ops = &active_row_ops();
}

void OnlineBlock::begin(const float* q, index_t ldq, index_t rows, index_t d) {
  if (rows > max_rows_) detail::fail(ErrorKind::internal, "OnlineBlock", "block larger than its workspace");
  q_ = q;
  ldq_ = ldq;
  rows_ = rows;
  d_ = d;
  std::fill_n(acc_.get(), rows * dv_, 0.0f);
  // Softmax tracks the running max logit, the power kernel the running max |logit|.
  const float init = params_.kernel == Kernel::softmax ? -std::numeric_limits<float>::infinity()
                                                       : -1.0f;
  std::fill_n(max_.get(), rows, init);
  std::fill_n(sum_.get(), rows, 0.0);
  overflow_ = false;
  if (params_.bf16) {
    q16_.resize(static_cast<std::size_t>(rows * ((d + 1) / 2)));
    bf16_pairs_along_rows(q, rows, d, ldq, q16_.data());
  }
}

float* OnlineBlock::logits(const float* k, index_t ldk, index_t count) {
  if (count > max_tile_) detail::fail(ErrorKind::internal, "OnlineBlock", "tile larger than its workspace");
  count_ = count;
  if (count <= kNarrowTile) {
    // A narrow tile: its keys transposed once, then register-blocked rows (no BLAS set-up).
    keys_t_.resize(static_cast<std::size_t>(d_ * count));
    for (index_t j = 0; j < count; ++j)
      for (index_t t = 0; t < d_; ++t) keys_t_[t * count + j] = k[j * ldk + t];
    params_.ops->narrow_logits(rows_, count, d_, params_.scale, q_, ldq_, keys_t_.data(), tile_.get(), count);
  } else if (params_.bf16) {
    const index_t pairs = (d_ + 1) / 2;
    k16_.resize(static_cast<std::size_t>(pairs * count));
    bf16_pairs_transposed(k, count, d_, ldk, k16_.data());
    bf16_gemm(rows_, count, pairs, params_.scale, 0.0f, q16_.data(), pairs, k16_.data(), count, tile_.get(), count);
  } else {
    // Zeroed here and accumulated with beta = 1: OpenBLAS's own beta = 0 pass over the tile is a
    // slow loop (8% of dense attention on an AVX2 CPU), memset is not.
    std::memset(tile_.get(), 0, static_cast<std::size_t>(rows_ * count) * sizeof(float));
    detail::gemm_abt(rows_, count, d_, params_.scale, q_, ldq_, k, ldk, 1.0f, tile_.get(), count);
  }
  // Finite inputs can overflow here; such a logit must not pass for a masked one.
  if (params_.check_overflow && !detail::all_finite(tile_.get(), rows_ * count)) overflow_ = true;
  return tile_.get();
}

void OnlineBlock::weigh(float log_weight) {
  float* t = tile_.get();
  const index_t size = rows_ * count_;
  if (params_.kernel == Kernel::softmax) {
    for (index_t e = 0; e < size; ++e) t[e] += log_weight;
  } else {
    const float factor = std::exp(log_weight / params_.p);
    for (index_t e = 0; e < size; ++e) t[e] *= factor;
  }
}

bool OnlineBlock::power_update(index_t r, float* s, index_t c) {
  float& m = max_[r];
  float* o = acc_.get() + r * dv_;
  const float tmax = params_.ops->abs_row_max(s, c);
  if (tmax <= 0.0f) {  // masked or all logits zero: no weight
    std::fill_n(s, c, 0.0f);
    return false;
  }
  const float mnew = std::max(m, tmax);
  const float corr = m <= 0.0f ? 0.0f : std::pow(m / mnew, params_.p);
  const float tsum = params_.ops->power_rel_sum(s, c, mnew, params_.p);
  sum_[r] = sum_[r] * corr + tsum;
  if (corr != 1.0f)
    for (index_t j = 0; j < dv_; ++j) o[j] *= corr;
  m = mnew;
  return true;
}

void OnlineBlock::absorb(const float* v, index_t ldv, index_t count) {
  const index_t c = count;
  bool any = false;
  if (params_.kernel == Kernel::softmax) {
    // All rows in one call of the ISA kernel (per-row calls cost more than a narrow tile's work).
    any = params_.ops->softmax_update(tile_.get(), rows_, c, max_.get(), sum_.get(), acc_.get(), dv_);
  } else {
    for (index_t r = 0; r < rows_; ++r) any |= power_update(r, tile_.get() + r * c, c);
  }
  if (!any) return;
  if (c <= kNarrowTile) {
    params_.ops->narrow_weighted_sum(rows_, c, dv_, tile_.get(), c, v, ldv, acc_.get(), dv_);
  } else if (params_.bf16) {
    const index_t pairs = (c + 1) / 2;
    p16_.resize(static_cast<std::size_t>(rows_ * pairs));
    v16_.resize(static_cast<std::size_t>(pairs * dv_));
    bf16_pairs_along_rows(tile_.get(), rows_, c, c, p16_.data());
    bf16_pairs_down_columns(v, c, dv_, ldv, v16_.data());
    bf16_gemm(rows_, dv_, pairs, 1.0f, 1.0f, p16_.data(), pairs, v16_.data(), dv_, acc_.get(), dv_);
  } else {
    detail::gemm_ab(rows_, dv_, c, 1.0f, tile_.get(), c, v, ldv, 1.0f, acc_.get(), dv_);
  }
}

void OnlineBlock::absorb_row(index_t r, const float* k, index_t ldk, const float* v, index_t ldv, const index_t* keys,
                             index_t count) {
  if (r < 0 || r >= rows_) detail::fail(ErrorKind::internal, "OnlineBlock", "row outside the block");
  float* s = tile_.get();  // the tile buffer as one row's scratch (the block's tile is spent)
  float* acc = acc_.get() + r * dv_;
  const float* q = q_ + r * ldq_;
  for (index_t j0 = 0; j0 < count; j0 += max_tile_) {
    const index_t c = std::min(max_tile_, count - j0);
    const index_t* idx = keys + j0;
    keys_t_.resize(static_cast<std::size_t>(d_ * c));
    if (c <= kNarrowTile) {  // a few keys: transposed as gathered, the ISA's register-blocked product
      for (index_t j = 0; j < c; ++j)
        for (index_t t = 0; t < d_; ++t) keys_t_[t * c + j] = k[idx[j] * ldk + t];
      params_.ops->narrow_logits(1, c, d_, params_.scale, q, ldq_, keys_t_.data(), s, c);
    } else {  // straight from the gathered rows: a copy and a BLAS call cost more
      params_.ops->gathered_dots(q, idx, c, k, ldk, d_, params_.scale, s);
    }
    if (params_.check_overflow && !detail::all_finite(s, c)) overflow_ = true;
    const bool any = params_.kernel == Kernel::softmax
                         ? params_.ops->softmax_update(s, 1, c, max_.get() + r, sum_.get() + r, acc, dv_)
                         : power_update(r, s, c);
    if (any) params_.ops->gathered_weighted_sum(s, idx, c, v, ldv, dv_, acc);
  }
}

OnlineBlock::Rows OnlineBlock::finish(float* out, index_t ldo, float* stat) {
  Rows rows;
  for (index_t r = 0; r < rows_; ++r) {
    float* dst = out + r * ldo;
    if (overflow_ || !std::isfinite(sum_[r])) {  // overflowing logits: the caller reports it
      std::fill_n(dst, dv_, std::numeric_limits<float>::quiet_NaN());
      if (stat) stat[r] = std::numeric_limits<float>::quiet_NaN();
      ++rows.non_finite;
      continue;
    }
    if (!(sum_[r] > 0.0)) {
      std::fill_n(dst, dv_, 0.0f);
      if (stat) stat[r] = std::numeric_limits<float>::infinity();
      ++rows.empty;
      continue;
    }
    const float* o = acc_.get() + r * dv_;
    const float inv = static_cast<float>(1.0 / sum_[r]);
    for (index_t j = 0; j < dv_; ++j) dst[j] = o[j] * inv;
    // sum_ is relative to the running maximum: exp(m) (softmax) or m^p (power) times it.
    if (stat) {
      const double top = params_.kernel == Kernel::softmax ? static_cast<double>(max_[r])
                                                           : params_.p * std::log(static_cast<double>(max_[r]));
      stat[r] = static_cast<float>(top + std::log(sum_[r]));
    }
    rows.non_finite += detail::all_finite(dst, dv_) ? 0 : 1;  // huge values can overflow the sum
  }
  return rows;
}

}  // namespace levattn::kernels
