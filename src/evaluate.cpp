// The evaluation tool: per pair, the full rows of softmax, x^2 and |x|^p attention by query
// blocks, each selection's mask over them, and each selection's output against full attention.
#include "levattn/evaluate.hpp"

#include <algorithm>
#include <charconv>
#include <string_view>
#include <type_traits>
#include <cmath>
#include <sstream>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/leverage_scores.hpp"
#include "levattn/selected_attention.hpp"
#include "levattn/sketch.hpp"

namespace levattn {
namespace {

constexpr index_t kRows = 32;

// Sums over one block of queries, for one selection.
struct Partial {
  double mass = 0.0;
  index_t x2 = 0, x2_in = 0, pw = 0, pw_in = 0;
  double keys = 0.0;
};

// mask[j] = whether query i of pair h attends key j under selection s.
void mask_of(const Selection& s, index_t h, index_t i, std::vector<char>& mask) {
  std::fill(mask.begin(), mask.end(), s.all_keys ? 1 : 0);
  for (index_t j : s.shared_of(h, i)) mask[j] = 1;
  if (s.window >= 0)
    for (index_t j = std::max<index_t>(0, i - s.window); j <= std::min(s.n - 1, i + s.window); ++j) mask[j] = 1;
  for (index_t a = 0; a < s.top_k; ++a) {
    const index_t j = s.query_keys[(h * s.m + i) * s.top_k + a];
    if (j >= 0) mask[j] = 1;
  }
  if (s.causal) std::fill(mask.begin() + std::min(s.n, i + 1), mask.end(), 0);
}

// Relative Frobenius distance of a from b.
double rel_distance(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace

AttentionOptions parse_selection(const std::string& spec) {
  const auto bad = [&](const std::string& why) -> AttentionOptions {
    detail::invalid("selection '" + spec + "': " + why);
  };
  std::vector<std::string> items;
  std::stringstream in(spec);
  for (std::string item; std::getline(in, item, '+');) items.push_back(item);
  if (items.empty() || items[0].empty()) return bad("expected NAME[:VALUE][+FIELD:VALUE...]");
  // A name the library's own parsers read (select, kernel, sketch kind), their error under the spec's.
  const auto named = [&](auto parse, const std::string& text) {
    try {
      return parse(text);
    } catch (const Error& e) {
      bad(e.what());
      throw;
    }
  };
  AttentionOptions o;
  const auto colon = items[0].find(':');
  o.select = named(parse_select, items[0].substr(0, colon));
  const auto number = [&](const std::string& text, const std::string& what) {
    std::size_t used = 0;
    double v = 0.0;
    try {
      v = std::stod(text, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != text.size() || !std::isfinite(v)) bad(what + ": expected a number, got '" + text + "'");
    return v;
  };
  const auto integer = [&](const std::string& text, const std::string& what) {
    const double v = number(text, what);
    if (v != std::floor(v) || std::fabs(v) > 9e15) bad(what + ": expected an integer, got '" + text + "'");
    return static_cast<index_t>(v);
  };
  const auto seed = [&](const std::string& text, const std::string& what) {
    const index_t v = integer(text, what);
    if (v < 0) bad(what + ": expected an integer >= 0");
    return static_cast<std::uint64_t>(v);
  };
  if (colon != std::string::npos) {
    const std::string value = items[0].substr(colon + 1);
    if (o.select == Select::window) o.window = integer(value, "window");
    else if (o.select == Select::full) bad("full takes no value");
    else o.top_k = integer(value, "top_k");
  }
  LeverageOptions& lev = o.leverage;
  for (std::size_t a = 1; a < items.size(); ++a) {
    const auto c = items[a].find(':');
    if (c == std::string::npos) bad("expected FIELD:VALUE, got '" + items[a] + "'");
    const std::string field = items[a].substr(0, c), value = items[a].substr(c + 1);
    if (field == "top_k") o.top_k = integer(value, field);
    else if (field == "eps") o.eps = number(value, field);
    else if (field == "window") o.window = integer(value, field);
    else if (field == "sinks") o.sinks = integer(value, field);
    else if (field == "probe") o.probe = integer(value, field);
    else if (field == "clusters") o.clusters = integer(value, field);
    else if (field == "iterations") o.cluster_iterations = integer(value, field);
    else if (field == "seed") o.seed = seed(value, field);
    else if (field == "p") o.p = number(value, field);
    else if (field == "kernel") o.kernel = named(parse_kernel, value);
    else if (field == "budget_alpha") o.budget_alpha = number(value, field);
    else if (field == "budget_exponent") o.budget_exponent = number(value, field);
    else if (field == "method") {
      if (value != "exact" && value != "sketch") bad("method: expected exact or sketch, got '" + value + "'");
      lev.method = value == "exact" ? ScoreMethod::exact : ScoreMethod::sketch;
    } else if (field == "ridge") lev.ridge = number(value, field);
    else if (field == "rank_rtol") lev.rank_rtol = number(value, field);
    else if (field == "sketch") lev.sketch = named(parse_sketch_kind, value);
    else if (field == "sketch_size") lev.sketch_size = integer(value, field);
    else if (field == "gamma") lev.gamma = number(value, field);
    else if (field == "jl_columns") lev.jl_columns = integer(value, field);
    else if (field == "delta") lev.delta = number(value, field);
    else if (field == "sketch_seed") lev.seed = seed(value, field);
    else
      bad("unknown field '" + field + "' (expected top_k, eps, window, sinks, probe, clusters, iterations, seed, p, "
          "kernel, budget_alpha, budget_exponent, method, ridge, rank_rtol, sketch, sketch_size, gamma, jl_columns, "
          "delta or sketch_seed)");
  }
  return o;
}

std::string selection_spec(const AttentionOptions& o) {
  const AttentionOptions d;  // the defaults, which the spec leaves out
  const LeverageOptions& l = o.leverage;
  std::ostringstream os;
  os << to_string(o.select);
  const auto field = [&](bool differs, const char* name, const auto& value) {
    if (!differs) return;
    os << '+' << name << ':';
    if constexpr (std::is_floating_point_v<std::decay_t<decltype(value)>>) {
      char text[32];  // the shortest text that reads back as the same double
      os << std::string_view(text, static_cast<std::size_t>(std::to_chars(text, text + sizeof text, value).ptr - text));
    } else {
      os << value;
    }
  };
  field(o.top_k != d.top_k, "top_k", o.top_k);
  field(o.eps != d.eps, "eps", o.eps);
  field(o.window != d.window, "window", o.window);
  field(o.sinks != d.sinks, "sinks", o.sinks);
  field(o.probe != d.probe, "probe", o.probe);
  field(o.clusters != d.clusters, "clusters", o.clusters);
  field(o.cluster_iterations != d.cluster_iterations, "iterations", o.cluster_iterations);
  field(o.seed != d.seed, "seed", o.seed);
  field(o.kernel != d.kernel, "kernel", to_string(o.kernel));
  field(o.p != d.p, "p", o.p);
  field(o.budget_alpha != d.budget_alpha, "budget_alpha", o.budget_alpha);
  field(o.budget_exponent != d.budget_exponent, "budget_exponent", o.budget_exponent);
  field(l.method != d.leverage.method, "method", l.method == ScoreMethod::exact ? "exact" : "sketch");
  field(l.ridge != d.leverage.ridge, "ridge", l.ridge);
  field(l.rank_rtol != d.leverage.rank_rtol, "rank_rtol", l.rank_rtol);
  field(l.sketch != d.leverage.sketch, "sketch", to_string(l.sketch));
  field(l.sketch_size != d.leverage.sketch_size, "sketch_size", l.sketch_size);
  field(l.gamma != d.leverage.gamma, "gamma", l.gamma);
  field(l.jl_columns != d.leverage.jl_columns, "jl_columns", l.jl_columns);
  field(l.delta != d.leverage.delta, "delta", l.delta);
  field(l.seed != d.leverage.seed, "sketch_seed", l.seed);
  return os.str();
}

std::string describe(const AttentionOptions& o) {
  std::ostringstream os;
  os << to_string(o.select);
  if (o.top_k > 0) os << " top_k=" << o.top_k;
  if (o.eps > 0.0) os << " eps=" << o.eps;
  if (o.budget_alpha > 0.0) os << " budget=" << o.budget_alpha << "," << o.budget_exponent;
  if (o.window >= 0) os << " window=" << o.window;
  if (o.sinks > 0) os << " sinks=" << o.sinks;
  if (o.select == Select::cluster && o.probe > 0) os << " probe=" << o.probe;
  if (o.kernel != Kernel::softmax) os << " " << to_string(o.kernel) << " p=" << o.p;
  return os.str();
}

namespace {

// The row name of a selection on n keys: describe() plus the seed of the randomised selections,
// the probe cluster actually uses (its default depends on n and the budget) and a given scale.
std::string row_name(AttentionOptions o, index_t n) {
  if (o.select == Select::cluster) {
    const index_t c = o.clusters > 0 ? std::min(o.clusters, n)
                                     : static_cast<index_t>(std::ceil(std::sqrt(static_cast<double>(n))));
    o.probe = std::min(c, o.probe > 0 ? o.probe : default_probe(c, n, std::min(o.top_k, n)));
  }
  std::ostringstream os;
  os << describe(o);
  if (o.select == Select::random || o.select == Select::cluster) os << " seed=" << o.seed;
  if (!std::isnan(o.scale)) os << " scale=" << o.scale;
  return os.str();
}

}  // namespace

std::vector<Evaluation> evaluate(const Tensor4Ref& Q, const Tensor4Ref& K, const Tensor4Ref& V,
                                 const std::vector<AttentionOptions>& given, const EvaluateOptions& eo) {
  detail::require_eps(eo.heavy_eps, "heavy_eps");
  if (!(eo.p > 0.0 && std::isfinite(eo.p))) detail::invalid("p: expected a finite exponent > 0");
  if (!std::isnan(eo.scale) && !(eo.scale > 0.0 && std::isfinite(eo.scale))) {
    std::ostringstream os;
    os << "scale: expected a finite number > 0 (or none for the kernel's default), got " << eo.scale;
    detail::invalid(os.str());
  }
  if (given.empty()) detail::invalid("evaluate: give at least one selection");
  std::vector<AttentionOptions> selections(given);
  for (AttentionOptions& o : selections)
    if (std::isnan(o.scale)) o.scale = eo.scale;
  const index_t pairs = Q.batch * Q.heads, m = Q.rows, n = K.rows, d = Q.cols, dv = V.cols;
  std::vector<Selection> sel;
  std::vector<std::vector<float>> approx;
  for (const AttentionOptions& o : selections) {
    try {
      sel.push_back(select_keys(Q, K, o));
      approx.emplace_back(static_cast<std::size_t>(checked_elements({pairs, m, dv}, "evaluate output")));
      attention(Q, K, V, approx.back().data(), o);
    } catch (const Error& e) {
      throw Error(e.kind(), row_name(o, n) + ": " + e.what());
    }
  }
  std::vector<Evaluation> rows;
  const index_t blocks = (m + kRows - 1) / kRows, cases = static_cast<index_t>(selections.size());
  for (index_t h = 0; h < pairs; ++h) {
    const ConstMatrix Qh = Q.slice(h / Q.heads, h % Q.heads), Kh = K.slice(h / Q.heads, h % Q.heads);
    std::vector<Partial> part(static_cast<std::size_t>(blocks * cases));
    struct Workspace {
      std::vector<float> s;
      std::vector<double> soft, x2, pw;
      std::vector<char> mask;
    };
    const auto make = [&] {
      return Workspace{std::vector<float>(static_cast<std::size_t>(kRows * n)), std::vector<double>(n),
                       std::vector<double>(n), std::vector<double>(n), std::vector<char>(n)};
    };
    const double scale0 = 1.0 / std::sqrt(static_cast<double>(d));
    detail::parallel_tasks(blocks, 2.0 * static_cast<double>(m * n * d), make, [&](index_t b, Workspace& w) {
      const index_t i0 = b * kRows, r1 = std::min(kRows, m - i0);
      detail::gemm_abt(r1, n, d, 1.0f, Qh.row(i0), Qh.ld, Kh.data, Kh.ld, 0.0f, w.s.data(), n);
      for (index_t r = 0; r < r1; ++r) {
        const float* s = w.s.data() + r * n;
        double z2 = 0.0, zp = 0.0;  // x^2 and |x|^p rows (free of the scale)
        for (index_t j = 0; j < n; ++j) {
          z2 += (w.x2[j] = static_cast<double>(s[j]) * s[j]);
          zp += (w.pw[j] = std::pow(std::fabs(static_cast<double>(s[j])), eo.p));
        }
        for (index_t c = 0; c < cases; ++c) {
          // Softmax at the selection's own scale (or the default).
          const double sc = std::isnan(selections[c].scale) ? scale0 : selections[c].scale;
          double mx = -INFINITY, z = 0.0;
          for (index_t j = 0; j < n; ++j) mx = std::max(mx, sc * s[j]);
          for (index_t j = 0; j < n; ++j) z += (w.soft[j] = std::exp(sc * s[j] - mx));
          mask_of(sel[c], h, i0 + r, w.mask);
          Partial& p = part[b * cases + c];
          for (index_t j = 0; j < n; ++j) {
            const bool in = w.mask[j];
            p.keys += in;
            p.mass += in ? w.soft[j] / z : 0.0;
            if (z2 > 0.0 && w.x2[j] / z2 >= eo.heavy_eps) ++p.x2, p.x2_in += in;
            if (zp > 0.0 && w.pw[j] / zp >= eo.heavy_eps) ++p.pw, p.pw_in += in;
          }
        }
      }
    });
    // Full attention of each selection's kernel, for the output error.
    std::vector<float> full(static_cast<std::size_t>(m * dv));
    const Tensor4Ref q1{Qh.data, 1, 1, m, d}, k1{Kh.data, 1, 1, n, d},
        v1{V.slice(h / Q.heads, h % Q.heads).data, 1, 1, n, dv};
    const LeverageScores lev = leverage_scores(Kh);
    const auto [lo, hi] = std::minmax_element(lev.scores.begin(), lev.scores.end());
    const AttentionOptions* last = nullptr;  // full attention is recomputed only when the kernel changes
    for (index_t c = 0; c < cases; ++c) {
      const AttentionOptions& o = selections[c];
      const auto same = [](double a, double b) { return a == b || (std::isnan(a) && std::isnan(b)); };
      if (!last || last->kernel != o.kernel || !same(last->p, o.p) || !same(last->scale, o.scale)) {
        AttentionOptions f;
        f.kernel = o.kernel, f.p = o.p, f.scale = o.scale;
        attention(q1, k1, v1, full.data(), f);
        last = &o;
      }
      Partial t;
      for (index_t b = 0; b < blocks; ++b) {
        const Partial& p = part[b * cases + c];
        t.mass += p.mass, t.keys += p.keys, t.x2 += p.x2, t.x2_in += p.x2_in, t.pw += p.pw, t.pw_in += p.pw_in;
      }
      Evaluation e;
      e.pair = h;
      e.selection = row_name(selections[c], n);
      e.keys_per_query = t.keys / static_cast<double>(m);
      e.softmax_mass = t.mass / static_cast<double>(m);
      const std::vector<float> mine(approx[c].begin() + h * m * dv, approx[c].begin() + (h + 1) * m * dv);
      e.output_error = rel_distance(mine, full);
      e.x2_heavy = t.x2, e.power_heavy = t.pw;
      e.x2_heavy_recall = t.x2 ? static_cast<double>(t.x2_in) / static_cast<double>(t.x2) : 1.0;
      e.power_heavy_recall = t.pw ? static_cast<double>(t.pw_in) / static_cast<double>(t.pw) : 1.0;
      e.scores_tied = *hi - *lo <= 1e-6 * std::max(*hi, 1e-300);
      rows.push_back(e);
    }
  }
  return rows;
}

}  // namespace levattn
