// The one evaluator: per pair, the full rows of the kernel's, softmax, x^2 and |x|^p attention
// by query blocks, each selection's mask over them (Selection::mask_row), and each selection's
// output against the full attention of its kernel, formed in the same pass.
#include "levattn/evaluate.hpp"

#include <algorithm>
#include <cmath>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/leverage_scores.hpp"

namespace levattn {
namespace {

constexpr index_t kRows = 32;  // queries per task

// One selection to measure on one pair: its keys (pair `pair` of `selection`), its output on
// that pair (m x dv) and its kernel.
struct Case {
  const Selection* selection = nullptr;
  index_t pair = 0;
  const float* approx = nullptr;
  KernelOptions kernel;
};

// Sums over one block of queries, for one case.
struct Partial {
  double keys = 0.0, soft = 0.0, mass = 0.0, err2 = 0.0, ref2 = 0.0;
  index_t heavy = 0, heavy_in = 0, x2 = 0, x2_in = 0, pw = 0, pw_in = 0;
  Partial& operator+=(const Partial& o) {
    keys += o.keys, soft += o.soft, mass += o.mass, err2 += o.err2, ref2 += o.ref2;
    heavy += o.heavy, heavy_in += o.heavy_in, x2 += o.x2, x2_in += o.x2_in, pw += o.pw, pw_in += o.pw_in;
    return *this;
  }
};

double ratio(index_t a, index_t b) { return b > 0 ? static_cast<double>(a) / static_cast<double>(b) : 1.0; }

// Per-thread rows of one block: logits, the weights of a kernel, softmax weights, its full
// output, the x^2 and |x|^p heavy entries, the mask of a selection, the open keys.
struct Workspace {
  std::vector<float> s, w, full;
  std::vector<double> soft;
  std::vector<char> x2, pw, mask, open;
};

// w[0 .. n) <- the full attention weights of `kernel` at logit scale sc over logits s, 0 on
// closed keys (all 0 when the row's normaliser is 0).
template <class T>
void kernel_row(const KernelOptions& kernel, double sc, const float* s, const char* open, index_t n, T* w) {
  double z = 0.0, top = -INFINITY;
  if (kernel.kernel == Kernel::softmax)
    for (index_t j = 0; j < n; ++j) top = open[j] ? std::max(top, sc * s[j]) : top;
  for (index_t j = 0; j < n; ++j) {
    const double x = !open[j] ? 0.0
                     : kernel.kernel == Kernel::softmax ? std::exp(sc * s[j] - top)
                                                        : std::pow(std::fabs(sc * s[j]), kernel.p);
    z += x;
    w[j] = static_cast<T>(x);
  }
  for (index_t j = 0; j < n; ++j) w[j] = z > 0.0 ? static_cast<T>(w[j] / z) : T(0);
}

// flags[j] = whether entry j of row (s_j)^2 (p = 2) or |s_j|^p, normalised over the open keys, is
// at least eps.
void heavy_row(const float* s, const char* open, index_t n, double p, double eps, char* flags) {
  double z = 0.0;
  for (index_t j = 0; j < n; ++j) z += open[j] ? std::pow(std::fabs(static_cast<double>(s[j])), p) : 0.0;
  for (index_t j = 0; j < n; ++j)
    flags[j] = open[j] && z > 0.0 && std::pow(std::fabs(static_cast<double>(s[j])), p) / z >= eps;
}

// Every case on one pair (Qh m x d, Kh n x d, Vh n x dv): one Evaluation per case, in order.
// The cases share the pair's key mask. O(m n (d + cases (1 + dv))) time, O(kRows n) memory per
// thread; the same for any thread count.
std::vector<Evaluation> measure_pair(ConstMatrix Qh, ConstMatrix Kh, ConstMatrix Vh, const std::vector<Case>& cases,
                                     const EvaluateOptions& eo) {
  const index_t m = Qh.rows, n = Kh.rows, d = Qh.cols, dv = Vh.cols, count = static_cast<index_t>(cases.size());
  const Selection& first = *cases.front().selection;
  for (const Case& cs : cases)
    if (cs.selection->key_mask != first.key_mask)
      detail::fail(ErrorKind::internal, "evaluate", "the selections of one pair have different key masks");
  std::vector<char> open(static_cast<std::size_t>(n));
  for (index_t j = 0; j < n; ++j) open[j] = first.key_open(cases.front().pair, j);
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<Partial> part(static_cast<std::size_t>(blocks * count));
  const auto make = [&] {
    const auto z = static_cast<std::size_t>(kRows * n);
    return Workspace{std::vector<float>(z), std::vector<float>(z), std::vector<float>(static_cast<std::size_t>(kRows * dv)),
                     std::vector<double>(n), std::vector<char>(z), std::vector<char>(z), std::vector<char>(n), open};
  };
  const double flops = 2.0 * static_cast<double>(m * n) * static_cast<double>(d + count * dv);
  detail::parallel_tasks(blocks, flops, make, [&](index_t b, Workspace& w) {
    const index_t i0 = b * kRows, rows = std::min(kRows, m - i0);
    detail::gemm_abt(rows, n, d, 1.0f, Qh.row(i0), Qh.ld, Kh.data, Kh.ld, 0.0f, w.s.data(), n);
    for (index_t r = 0; r < rows; ++r) {  // free of the scale: the same for every case
      heavy_row(w.s.data() + r * n, w.open.data(), n, 2.0, eo.heavy_eps, w.x2.data() + r * n);
      heavy_row(w.s.data() + r * n, w.open.data(), n, eo.p, eo.heavy_eps, w.pw.data() + r * n);
    }
    for (index_t c = 0; c < count; ++c) {
      const Case& cs = cases[c];
      const double sc = logit_scale(cs.kernel, d);
      // Softmax mass at the selection's scale, or 1/sqrt(d) for a kernel whose default scale is 1.
      KernelOptions soft;
      soft.scale = std::isnan(cs.kernel.scale) ? 1.0 / std::sqrt(static_cast<double>(d)) : cs.kernel.scale;
      Partial& p = part[b * count + c];
      for (index_t r = 0; r < rows; ++r) {
        const float* s = w.s.data() + r * n;
        float* wr = w.w.data() + r * n;
        const char *x2 = w.x2.data() + r * n, *pw = w.pw.data() + r * n;
        kernel_row(cs.kernel, sc, s, w.open.data(), n, wr);
        kernel_row(soft, soft.scale, s, w.open.data(), n, w.soft.data());
        cs.selection->mask_row(cs.pair, i0 + r, w.mask.data());
        for (index_t j = 0; j < n; ++j) {
          if (!w.open[j]) continue;
          const bool in = w.mask[j];
          p.keys += in;
          if (in) p.soft += w.soft[j], p.mass += wr[j];
          if (wr[j] >= eo.heavy_eps) ++p.heavy, p.heavy_in += in;
          if (x2[j]) ++p.x2, p.x2_in += in;
          if (pw[j]) ++p.pw, p.pw_in += in;
        }
      }
      // The full attention of the case's kernel over these rows, against the selection's output.
      detail::gemm_ab(rows, dv, n, 1.0f, w.w.data(), n, Vh.data, Vh.ld, 0.0f, w.full.data(), dv);
      for (index_t x = 0; x < rows * dv; ++x) {
        const double ref = w.full[x], diff = static_cast<double>(cs.approx[i0 * dv + x]) - ref;
        p.err2 += diff * diff;
        p.ref2 += ref * ref;
      }
    }
  });
  const LeverageScores lev = leverage_scores(Kh);
  const auto [lo, hi] = std::minmax_element(lev.scores.begin(), lev.scores.end());
  std::vector<Evaluation> out;
  for (index_t c = 0; c < count; ++c) {
    Partial t;
    for (index_t b = 0; b < blocks; ++b) t += part[b * count + c];  // block order: any thread count
    Evaluation e;
    e.pair = cases[c].pair;
    e.keys_per_query = t.keys / static_cast<double>(m);
    e.softmax_mass = t.soft / static_cast<double>(m);
    e.kernel_mass = t.mass / static_cast<double>(m);
    e.kernel_heavy = t.heavy, e.kernel_heavy_recall = ratio(t.heavy_in, t.heavy);
    e.output_error = t.ref2 > 0.0 ? std::sqrt(t.err2 / t.ref2) : std::sqrt(t.err2);
    e.x2_heavy = t.x2, e.x2_heavy_recall = ratio(t.x2_in, t.x2);
    e.power_heavy = t.pw, e.power_heavy_recall = ratio(t.pw_in, t.pw);
    e.scores_tied = *hi - *lo <= 1e-6 * std::max(*hi, 1e-300);
    out.push_back(e);
  }
  return out;
}

void check_evaluate_options(const EvaluateOptions& eo) {
  detail::require_eps(eo.heavy_eps, "heavy_eps");
  LEVATTN_REQUIRE(eo.p > 0.0 && std::isfinite(eo.p), "p", "expected a finite exponent > 0");
  LEVATTN_REQUIRE(std::isnan(eo.scale) || (eo.scale > 0.0 && std::isfinite(eo.scale)), "scale",
                  "expected a finite number > 0 (or none for the kernel's default), got ", eo.scale);
}

// The row name of a selection on n keys: its spec with the probe cluster actually uses (the
// default depends on n and the budget).
std::string row_name(AttentionOptions o, index_t n) {
  if (o.select == Select::cluster) {
    const index_t c = o.clusters > 0 ? std::min(o.clusters, n)
                                     : static_cast<index_t>(std::ceil(std::sqrt(static_cast<double>(n))));
    o.probe = std::min(c, o.probe > 0 ? o.probe : default_probe(c, n, std::min(o.top_k, n)));
  }
  return selection_spec(o);
}

}  // namespace

std::vector<Evaluation> evaluate(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V,
                                 const std::vector<AttentionOptions>& given, const EvaluateOptions& eo) {
  check_evaluate_options(eo);
  LEVATTN_REQUIRE(!given.empty(), "evaluate", "give at least one selection");
  std::vector<AttentionOptions> selections(given);
  const index_t pairs = Q.batch * Q.heads, m = Q.rows, n = K.rows, dv = V.cols;
  std::vector<Selection> sel;
  std::vector<std::vector<float>> approx;
  for (AttentionOptions& o : selections) {
    if (std::isnan(o.scale)) o.scale = eo.scale;
    o.return_selection = true;
    try {
      approx.emplace_back(static_cast<std::size_t>(checked_elements({pairs, m, dv}, "evaluate output")));
      sel.push_back(attention(Q, K, V, approx.back().data(), o).selection);
    } catch (const Error& e) {
      detail::fail(e.kind(), row_name(o, n), e.what());
    }
  }
  std::vector<Evaluation> rows;
  for (index_t h = 0; h < pairs; ++h) {
    std::vector<Case> cases;
    for (std::size_t c = 0; c < selections.size(); ++c)
      cases.push_back({&sel[c], h, approx[c].data() + h * m * dv, selections[c]});
    const index_t b = h / Q.heads, qh = h % Q.heads, kh = qh / (Q.heads / K.heads);
    std::vector<Evaluation> got = measure_pair(Q.slice(b, qh), K.slice(b, kh), V.slice(b, kh), cases, eo);
    for (std::size_t c = 0; c < got.size(); ++c) {
      got[c].selection = row_name(selections[c], n);
      got[c].scale = logit_scale(selections[c], Q.cols);
      rows.push_back(std::move(got[c]));
    }
  }
  return rows;
}

Evaluation selection_metrics(ConstMatrix Q, ConstMatrix K, ConstMatrix V, const float* approx,
                             const KernelOptions& kernel, const Selection& selection, const EvaluateOptions& eo) {
  check_evaluate_options(eo);
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  detail::require_finite_matrix(V, "values");
  detail::check_kernel(kernel);
  LEVATTN_REQUIRE(Q.cols == K.cols && V.rows == K.rows, "selection_metrics",
                  "expected queries and keys of equal d and one value per key");
  LEVATTN_REQUIRE(approx != nullptr, "selection_metrics", "null approximate output");
  LEVATTN_REQUIRE(selection.pairs() == 1 && selection.m == Q.rows && selection.n == K.rows, "selection",
                  "expected the selection of one (batch, head) pair with ", Q.rows, " queries and ", K.rows,
                  " keys (attention(..., return_selection) on these arrays), got ", selection.pairs(), " pairs, ",
                  selection.m, " queries and ", selection.n, " keys");
  LEVATTN_REQUIRE(!selection.causal, "selection_metrics",
                  "compares with non-causal full attention; causal selections are not supported");
  for (const auto& set : selection.shared_keys)
    for (index_t j : set)
      LEVATTN_REQUIRE(j >= 0 && j < K.rows, "selection", "a shared key index is out of range");
  LEVATTN_REQUIRE(static_cast<index_t>(selection.query_keys.size()) == selection.m * selection.top_k, "selection",
                  "expected query_keys of m * top_k entries");
  for (index_t j : selection.query_keys)
    LEVATTN_REQUIRE(j >= -1 && j < K.rows, "selection", "a query's key index is out of range");
  KernelOptions k = kernel;
  if (std::isnan(k.scale)) k.scale = eo.scale;
  Evaluation e = measure_pair(Q, K, V, {{&selection, 0, approx, k}}, eo).front();
  e.scale = logit_scale(k, Q.cols);
  return e;
}

}  // namespace levattn
