// Attention driver: validates, builds each head's selection, then runs the online kernel over
// (head, query block) tasks in parallel.
#include "levattn/attention.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <sstream>

#include "detail/leverage.hpp"
#include "detail/parallel.hpp"
#include "detail/selection.hpp"
#include "detail/validate.hpp"
#include "kernels/online_attention.hpp"
#include "levattn/lewis_weights.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

ConstMatrix flat(const Tensor4Ref& t) { return {t.data, t.batch * t.heads * t.rows, t.cols}; }

void check_shapes(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V, float* out) {
  std::ostringstream os;
  const std::pair<const Tensor4Ref*, const char*> args[] = {{&Q, "queries"}, {&K, "keys"}, {&V, "values"}};
  for (const auto& [t, name] : args) {
    if (t->rows < 1 || t->cols < 1) {
      os << name << ": expected a non-empty array, got " << t->rows << " rows of " << t->cols
         << " columns";
      detail::invalid(os.str());
    }
  }
  if (!Q.data || !K.data || !V.data || !out) {
    detail::invalid("attention: null data pointer for queries, keys, values or output");
  }
  if (Q.batch < 1 || Q.heads < 1) {
    os << "queries: expected batch >= 1 and heads >= 1, got (" << Q.batch << ", " << Q.heads << ")";
    detail::invalid(os.str());
  }
  if (K.batch != Q.batch || K.heads != Q.heads || V.batch != Q.batch || V.heads != Q.heads) {
    os << "keys/values: expected the queries' (batch, heads) = (" << Q.batch << ", " << Q.heads
       << "), got keys (" << K.batch << ", " << K.heads << "), values (" << V.batch << ", "
       << V.heads << ")";
    detail::invalid(os.str());
  }
  if (K.cols != Q.cols) {
    os << "keys: expected " << Q.cols << " columns (the queries' dimension d), got " << K.cols;
    detail::invalid(os.str());
  }
  if (V.rows != K.rows) {
    os << "values: expected " << K.rows << " rows (one per key), got " << V.rows;
    detail::invalid(os.str());
  }
  detail::require_finite_matrix(flat(Q), "queries");
  detail::require_finite_matrix(flat(K), "keys");
  detail::require_finite_matrix(flat(V), "values");
}

// Replaces an adaptive budget by the top_k it gives for n keys.
AttentionOptions resolve_budget(const AttentionOptions& options, index_t n) {
  AttentionOptions o = options;
  if (o.budget_alpha == 0.0 && o.budget_exponent == 0.0) return o;
  if (o.top_k != 0) detail::invalid("budget: give either top_k or an adaptive budget, not both");
  if (o.select != Select::topk && o.select != Select::leverage && o.select != Select::random)
    detail::invalid("budget: applies to select topk, leverage and random only");
  o.top_k = adaptive_budget(n, o.budget_alpha, o.budget_exponent);
  o.budget_alpha = o.budget_exponent = 0.0;
  return o;
}

void check_options(const AttentionOptions& o) {
  std::ostringstream os;
  if (o.kernel == Kernel::power && !(o.p > 0.0 && std::isfinite(o.p))) {
    os << "p: expected a finite exponent > 0, got " << o.p;
    detail::invalid(os.str());
  }
  if (!std::isnan(o.scale) && !std::isfinite(o.scale)) {
    os << "scale: expected a finite number, got " << o.scale;
    detail::invalid(os.str());
  }
  if (o.window < -1) {
    os << "window: expected an integer >= 0 (or -1 for none), got " << o.window;
    detail::invalid(os.str());
  }
  if (o.sinks < 0) {
    os << "sinks: expected an integer >= 0, got " << o.sinks;
    detail::invalid(os.str());
  }
  const bool local = o.window >= 0 || o.sinks > 0;
  if (o.eps != 0.0 && o.select != Select::leverage)
    detail::invalid("eps: applies to select leverage only, got select " + to_string(o.select));
  if (o.top_k != 0 && (o.select == Select::full || o.select == Select::none))
    detail::invalid("top_k: select " + to_string(o.select) + " takes no key budget");
  switch (o.select) {
    case Select::full:
    case Select::topk:
      if (local)
        detail::invalid("select " + to_string(o.select) +
                        ": window and sinks combine only with leverage, random or none");
      if (o.select == Select::topk && o.top_k < 1) {
        os << "top_k: select topk needs a budget >= 1, got " << o.top_k;
        detail::invalid(os.str());
      }
      break;
    case Select::leverage:
      if ((o.top_k > 0) == (o.eps > 0.0))
        detail::invalid("select leverage: give exactly one of top_k >= 1 or eps in (0, 1]");
      if (o.eps != 0.0 || o.top_k <= 0) detail::require_eps(o.eps);
      if (o.top_k < 0) detail::invalid("top_k: expected an integer >= 1");
      break;
    case Select::random:
      if (o.top_k < 1) {
        os << "top_k: select random needs a budget >= 1, got " << o.top_k;
        detail::invalid(os.str());
      }
      break;
    case Select::none:
      if (!local) detail::invalid("select none: give a window >= 0 or sinks >= 1");
      break;
  }
}

// The keys shared by every query of one head, gathered contiguously.
struct HeadSelection {
  std::vector<index_t> keys;  // ascending
  std::vector<float> k, v;    // |keys| x d and |keys| x dv
  std::vector<char> member;   // n flags, only when a window needs de-duplication
};

std::vector<index_t> shared_keys(const AttentionOptions& o, ConstMatrix K, std::uint64_t stream) {
  std::vector<index_t> keys;
  if (o.select == Select::leverage) {
    // |x|^p attention selects by its own sensitivity bounds (Lewis weights); softmax and x^2 by
    // leverage scores.
    const bool lewis = o.kernel == Kernel::power && o.p != 2.0;
    const LeverageScores s = lewis ? sensitivity_bounds(K, o.p, o.leverage)
                             : o.leverage.method == ScoreMethod::sketch
                                 ? leverage_scores(K, o.leverage)
                                 : detail::scores_unchecked(K, key_gram(K, o.leverage));
    keys = (o.top_k > 0 ? universal_set_top_k(s, o.top_k) : universal_set(s, o.eps)).indices;
  } else if (o.select == Select::random) {
    keys = detail::random_keys(K.rows, o.top_k, o.seed, stream);
  }
  const index_t sinks = std::min(o.sinks, K.rows);
  if (sinks > 0) {
    std::vector<index_t> merged;
    std::vector<index_t> first(static_cast<std::size_t>(sinks));
    for (index_t j = 0; j < sinks; ++j) first[j] = j;
    std::set_union(keys.begin(), keys.end(), first.begin(), first.end(), std::back_inserter(merged));
    keys.swap(merged);
  }
  return keys;
}

}  // namespace

std::string to_string(Kernel k) { return k == Kernel::softmax ? "softmax" : "poly"; }

std::string to_string(Select s) {
  switch (s) {
    case Select::full: return "full";
    case Select::leverage: return "leverage";
    case Select::topk: return "topk";
    case Select::random: return "random";
    case Select::none: return "none";
  }
  return "?";
}

index_t adaptive_budget(index_t n, double alpha, double exponent) {
  if (!(alpha > 0.0 && std::isfinite(alpha)) || !(exponent > 0.0 && exponent <= 1.0)) {
    std::ostringstream os;
    os << "budget: expected alpha > 0 and C in (0, 1], got alpha = " << alpha << ", C = " << exponent;
    detail::invalid(os.str());
  }
  const double k = std::ceil(alpha * std::pow(static_cast<double>(n), exponent));
  return static_cast<index_t>(std::clamp(k, 1.0, static_cast<double>(std::max<index_t>(n, 1))));
}

AttentionResult attention(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V,
                          float* out, const AttentionOptions& options) {
  check_shapes(Q, K, V, out);
  const AttentionOptions o = resolve_budget(options, K.rows);
  check_options(o);
  const index_t heads = Q.batch * Q.heads, m = Q.rows, n = K.rows, d = Q.cols, dv = V.cols;
  kernels::KernelParams params;
  params.kernel = o.kernel;
  params.p = static_cast<float>(o.p);
  params.scale = static_cast<float>(
      !std::isnan(o.scale) ? o.scale
                           : (o.kernel == Kernel::softmax ? 1.0 / std::sqrt(static_cast<double>(d))
                                                          : 1.0));
  {
    // Logits are bounded by |scale| max|q| max|k|; tiles need checking only if that can overflow.
    const auto max_norm = [](const Tensor4Ref& t) {
      const ConstMatrix a{t.data, t.batch * t.heads * t.rows, t.cols};
      double best = 0.0;
      for (index_t i = 0; i < a.rows; ++i) {
        double s = 0.0;
        for (index_t j = 0; j < a.cols; ++j) s += static_cast<double>(a(i, j)) * a(i, j);
        best = std::max(best, s);
      }
      return std::sqrt(best);
    };
    const double bound = std::fabs(static_cast<double>(params.scale)) * max_norm(Q) * max_norm(K);
    params.check_overflow = !(bound < 0.5 * static_cast<double>(std::numeric_limits<float>::max()));
  }
  AttentionResult res;
  res.top_k = std::min(o.top_k, n);

  // Selection.
  const auto t_sel = Clock::now();
  const bool shared = o.select == Select::leverage || o.select == Select::random ||
                      o.select == Select::none;
  // A window wider than both sequences sees everything; clamping keeps i +- window in range.
  const index_t window = std::min(o.window, std::max(m, n));
  std::vector<HeadSelection> sel(static_cast<std::size_t>(shared ? heads : 0));
  const index_t k_top = std::min(o.top_k, n);
  std::vector<index_t> top;  // topk: heads x m x k_top
  detail::ExceptionTrap trap;
  if (shared) {
    for (index_t h = 0; h < heads; ++h) {
      const ConstMatrix Kh = K.slice(h / Q.heads, h % Q.heads), Vh = V.slice(h / Q.heads, h % Q.heads);
      HeadSelection& s = sel[h];
      s.keys = shared_keys(o, Kh, static_cast<std::uint64_t>(h));
      const index_t u = static_cast<index_t>(s.keys.size());
      s.k.resize(static_cast<std::size_t>(u * d));
      s.v.resize(static_cast<std::size_t>(u * dv));
      for (index_t a = 0; a < u; ++a) {
        std::copy_n(Kh.row(s.keys[a]), d, s.k.data() + a * d);
        std::copy_n(Vh.row(s.keys[a]), dv, s.v.data() + a * dv);
      }
      if (window >= 0) {
        s.member.assign(static_cast<std::size_t>(n), 0);
        for (index_t j : s.keys) s.member[j] = 1;
      }
      res.shared_sizes.push_back(u);
    }
  } else if (o.select == Select::topk) {
    top.resize(static_cast<std::size_t>(heads * m * k_top));
    const index_t blocks = (m + kernels::kQueryBlock - 1) / kernels::kQueryBlock;
#pragma omp parallel if (heads * blocks > 1)
    {
      std::vector<float> tile;
#pragma omp for schedule(dynamic, 1) collapse(2)
      for (index_t h = 0; h < heads; ++h)
        for (index_t b = 0; b < blocks; ++b)
          trap.run([&] {
            const index_t i0 = b * kernels::kQueryBlock, i1 = std::min(m, i0 + kernels::kQueryBlock);
            detail::top_keys(params, Q.slice(h / Q.heads, h % Q.heads),
                             K.slice(h / Q.heads, h % Q.heads), k_top, i0, i1,
                             top.data() + (h * m + i0) * k_top, tile);
          });
    }
    trap.rethrow();
    res.shared_sizes.assign(static_cast<std::size_t>(heads), 0);
  } else {
    res.shared_sizes.assign(static_cast<std::size_t>(heads), n);
  }
  res.seconds_selection = seconds_since(t_sel);

  // Attention over the selection: one task per (head, query block).
  const auto t_att = Clock::now();
  const index_t qblock = kernels::kQueryBlock;
  const index_t blocks = (m + qblock - 1) / qblock;
  const index_t tasks = heads * blocks;
  const index_t tile_width = kernels::kKeyTile;
  std::atomic<index_t> done{0};
  index_t empty = 0;
  double keys_total = 0.0;
#pragma omp parallel reduction(+ : empty, keys_total) if (tasks > 1)
  {
    kernels::OnlineBlock blk(params, qblock, tile_width, dv);
    std::vector<float> gk, gv;  // topk gather buffers
#pragma omp for schedule(dynamic, 1)
    for (index_t t = 0; t < tasks; ++t) {
      trap.run([&] {
        const index_t h = t / blocks, b = t % blocks;
        const index_t bb = h / Q.heads, hh = h % Q.heads;
        const ConstMatrix Qh = Q.slice(bb, hh), Kh = K.slice(bb, hh), Vh = V.slice(bb, hh);
        const index_t i0 = b * qblock, rows = std::min(qblock, m - i0);
        float* dst = out + (h * m + i0) * dv;
        if (o.select == Select::topk) {
          const index_t width = std::min(k_top, tile_width);
          gk.resize(static_cast<std::size_t>(width * d));
          gv.resize(static_cast<std::size_t>(width * dv));
          for (index_t r = 0; r < rows; ++r) {
            const index_t* keys = top.data() + (h * m + i0 + r) * k_top;
            blk.begin(Qh.row(i0 + r), d, 1, d);
            for (index_t c0 = 0; c0 < k_top; c0 += width) {  // the query's keys, tile by tile
              const index_t c = std::min(width, k_top - c0);
              for (index_t a = 0; a < c; ++a) {
                std::copy_n(Kh.row(keys[c0 + a]), d, gk.data() + a * d);
                std::copy_n(Vh.row(keys[c0 + a]), dv, gv.data() + a * dv);
              }
              blk.logits(gk.data(), d, c);
              blk.absorb(gv.data(), dv, c);
            }
            empty += blk.finish(dst + r * dv, dv);
          }
          keys_total += static_cast<double>(rows * k_top);
          return;
        }
        blk.begin(Qh.row(i0), Qh.ld, rows, d);
        if (o.select == Select::full) {
          for (index_t c0 = 0; c0 < n; c0 += kernels::kKeyTile) {
            const index_t c = std::min(kernels::kKeyTile, n - c0);
            blk.logits(Kh.row(c0), Kh.ld, c);
            blk.absorb(Vh.row(c0), Vh.ld, c);
          }
          keys_total += static_cast<double>(rows * n);
        } else {
          const HeadSelection& s = sel[h];
          const index_t u = static_cast<index_t>(s.keys.size());
          for (index_t c0 = 0; c0 < u; c0 += tile_width) {
            const index_t c = std::min(tile_width, u - c0);
            blk.logits(s.k.data() + c0 * d, d, c);
            blk.absorb(s.v.data() + c0 * dv, dv, c);
          }
          keys_total += static_cast<double>(rows * u);
          if (window >= 0) {
            // The band of keys any query of the block can see, masked per row to its own
            // window minus the shared keys (already counted).
            const index_t j0 = std::max<index_t>(0, i0 - window);
            const index_t j1 = std::min(n, i0 + rows + window);
            for (index_t c0 = j0; c0 < j1; c0 += kernels::kKeyTile) {
              const index_t c = std::min(kernels::kKeyTile, j1 - c0);
              float* tile = blk.logits(Kh.row(c0), Kh.ld, c);
              for (index_t r = 0; r < rows; ++r) {
                const index_t i = i0 + r;
                float* srow = tile + r * c;
                for (index_t a = 0; a < c; ++a) {
                  const index_t j = c0 + a;
                  const bool in_window = j >= i - window && j <= i + window;
                  if (!in_window || s.member[j]) {
                    srow[a] = -std::numeric_limits<float>::infinity();
                  } else {
                    keys_total += 1.0;
                  }
                }
              }
              blk.absorb(Vh.row(c0), Vh.ld, c);
            }
          }
        }
        empty += blk.finish(dst, dv);
      });
      const index_t now = ++done;
      if (o.progress && omp_get_thread_num() == 0)
        trap.run([&] { o.progress(static_cast<double>(now) / static_cast<double>(tasks)); });
    }
  }
  trap.rethrow();
  res.seconds_attention = seconds_since(t_att);
  res.empty_rows = empty;
  res.mean_keys_per_query = keys_total / static_cast<double>(heads * m);

  // Finite inputs can still overflow float32 in the logits (|q||k| scale > 3e38).
  if (!detail::all_finite(out, heads * m * dv)) {
    detail::invalid("attention: the scaled logits overflow float32; rescale queries or keys "
                    "(or pass a smaller scale)");
  }
  if (o.return_selection) {
    if (shared)
      for (auto& s : sel) res.shared_keys.push_back(std::move(s.keys));
    res.query_keys = std::move(top);
  }
  return res;
}

std::vector<float> attention(ConstMatrix Q, ConstMatrix K, ConstMatrix V,
                             const AttentionOptions& options, AttentionResult* result) {
  if (Q.ld != Q.cols || K.ld != K.cols || V.ld != V.cols) {
    detail::invalid("attention: queries, keys and values must have contiguous rows (ld == cols)");
  }
  std::vector<float> out(static_cast<std::size_t>(std::max<index_t>(Q.rows, 0) *
                                                  std::max<index_t>(V.cols, 0)));
  const Tensor4Ref q{Q.data, 1, 1, Q.rows, Q.cols}, k{K.data, 1, 1, K.rows, K.cols},
      v{V.data, 1, 1, V.rows, V.cols};
  AttentionResult r = attention(q, k, v, out.empty() ? nullptr : out.data(), options);
  if (result) *result = std::move(r);
  return out;
}

}  // namespace levattn
