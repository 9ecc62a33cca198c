// The vocabulary of attention: selection names, budgets, the option checks and the selection
// spec text (levattn/options.hpp).
#include "levattn/options.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <sstream>
#include <string_view>
#include <type_traits>

#include "detail/names.hpp"
#include "detail/validate.hpp"

namespace levattn {

void detail::check_attention_options(const AttentionOptions& o) {
  detail::check_kernel(o);
  LEVATTN_REQUIRE(o.window >= -1, "window", "expected an integer >= 0 (or -1 for none), got ", o.window);
  LEVATTN_REQUIRE(o.sinks >= 0, "sinks", "expected an integer >= 0, got ", o.sinks);
  LEVATTN_REQUIRE(o.residual >= 0, "residual", "expected an integer >= 0 (0: none), got ", o.residual);
  LEVATTN_REQUIRE(o.residual == 0 || o.select != Select::full, "residual",
                  "select full attends every key and leaves none to sample");
  const bool local = o.window >= 0 || o.sinks > 0;
  const std::string select = to_string(o.select);
  LEVATTN_REQUIRE(o.eps == 0.0 || o.select == Select::leverage || o.select == Select::cluster, "eps",
                  "applies to select leverage and cluster only, got select ", select);
  // Options the chosen selection would not read are an error, not silently dropped.
  const bool cluster_set = o.clusters != 0 || o.probe != 0 || o.cluster_iterations != AttentionOptions{}.cluster_iterations;
  LEVATTN_REQUIRE(o.select == Select::cluster || !cluster_set, "clusters, probe, iterations",
                  "apply to select cluster only, got select ", select);
  LEVATTN_REQUIRE(o.top_k == 0 || (o.select != Select::full && o.select != Select::window), "top_k", "select ", select,
                  " takes no key budget");
  switch (o.select) {
    case Select::full:
    case Select::topk:
      LEVATTN_REQUIRE(!local, "select " + select, "window and sinks combine only with leverage, random, window or cluster");
      LEVATTN_REQUIRE(o.select != Select::topk || o.top_k >= 1, "top_k", "select topk needs a budget >= 1, got ",
                      o.top_k);
      break;
    case Select::leverage:
      LEVATTN_REQUIRE((o.top_k > 0) != (o.eps > 0.0), "select leverage",
                      "give exactly one of top_k >= 1 or eps in (0, 1]");
      if (o.eps != 0.0 || o.top_k <= 0) detail::require_eps(o.eps);
      LEVATTN_REQUIRE(o.top_k >= 0, "top_k", "expected an integer >= 1");
      break;
    case Select::random:
      LEVATTN_REQUIRE(o.top_k >= 1, "top_k", "select random needs a budget >= 1, got ", o.top_k);
      break;
    case Select::window:
      LEVATTN_REQUIRE(local, "select window", "give a window >= 0 or sinks >= 1");
      break;
    case Select::cluster:
      LEVATTN_REQUIRE(o.top_k >= 1, "top_k", "select cluster needs a per-query budget >= 1, got ", o.top_k);
      if (o.eps != 0.0) detail::require_eps(o.eps);
      LEVATTN_REQUIRE(o.clusters >= 0 && o.probe >= 0 && o.cluster_iterations >= 1, "cluster",
                      "expected clusters >= 0, probe >= 0 (0: defaults) and iterations >= 1, got ", o.clusters, ", ",
                      o.probe, ", ", o.cluster_iterations);
      break;
  }
  if (o.causal && o.select == Select::leverage) {
    LEVATTN_REQUIRE(o.top_k <= 0, "causal leverage",
                    "give eps (each block's causal universal set); top_k keys by prefix score cannot be kept exactly "
                    "in one pass");
    LEVATTN_REQUIRE(o.kernel != Kernel::power || o.p == 2.0, "causal leverage",
                    "the causal sets are x^2 leverage scores; with the poly kernel p must be 2");
    LEVATTN_REQUIRE(o.leverage.method == ScoreMethod::exact, "causal leverage", "needs exact scores (method exact)");
  }
}

namespace {

constexpr std::pair<Select, const char*> kSelectNames[] = {
    {Select::full, "full"},     {Select::leverage, "leverage"}, {Select::topk, "topk"},
    {Select::random, "random"}, {Select::window, "window"},     {Select::cluster, "cluster"}};

}  // namespace

std::string to_string(Select s) { return detail::name_of(kSelectNames, s); }

Select parse_select(const std::string& name) { return detail::parse_name(kSelectNames, name, "select"); }

index_t default_probe(index_t clusters, index_t n, index_t top_k) {
  const double c = static_cast<double>(clusters);
  const double keys = static_cast<double>(std::max<index_t>(n, 1));
  const double enough = std::ceil(2.0 * static_cast<double>(top_k) * c / keys);
  const double quarter = std::ceil(std::min(keys / 4.0, kMinCandidates) * c / keys);
  const double p = std::max({static_cast<double>(kMinProbe), std::ceil(c / kProbeDivisor), enough, quarter});
  return std::min(clusters, static_cast<index_t>(p));
}

index_t adaptive_budget(index_t n, double alpha, double exponent) {
  LEVATTN_REQUIRE(alpha > 0.0 && std::isfinite(alpha) && exponent > 0.0 && exponent <= 1.0, "budget",
                  "expected alpha > 0 and C in (0, 1], got alpha = ", alpha, ", C = ", exponent);
  const double k = std::ceil(alpha * std::pow(static_cast<double>(n), exponent));
  return static_cast<index_t>(std::clamp(k, 1.0, static_cast<double>(std::max<index_t>(n, 1))));
}

AttentionOptions parse_selection(const std::string& spec) {
  const auto bad = [&](const std::string& why) -> AttentionOptions {
    detail::fail(ErrorKind::invalid_argument, "selection '" + detail::printable(spec) + "'", why);
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
    if (used == 0 || used != text.size() || !std::isfinite(v)) bad(what + ": expected a number, got '" + detail::printable(text) + "'");
    return v;
  };
  const auto integer = [&](const std::string& text, const std::string& what) {
    const double v = number(text, what);
    if (v != std::floor(v) || std::fabs(v) > 9e15) bad(what + ": expected an integer, got '" + detail::printable(text) + "'");
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
    if (c == std::string::npos) bad("expected FIELD:VALUE, got '" + detail::printable(items[a]) + "'");
    const std::string field = items[a].substr(0, c), value = items[a].substr(c + 1);
    if (field == "top_k") o.top_k = integer(value, field);
    else if (field == "eps") o.eps = number(value, field);
    else if (field == "window") o.window = integer(value, field);
    else if (field == "sinks") o.sinks = integer(value, field);
    else if (field == "probe") o.probe = integer(value, field);
    else if (field == "clusters") o.clusters = integer(value, field);
    else if (field == "iterations") o.cluster_iterations = integer(value, field);
    else if (field == "seed") o.seed = seed(value, field);
    else if (field == "residual") o.residual = integer(value, field);
    else if (field == "p") o.p = number(value, field);
    else if (field == "kernel") o.kernel = named(parse_kernel, value);
    else if (field == "precision") o.precision = named(parse_precision, value);
    else if (field == "budget_alpha") o.budget_alpha = number(value, field);
    else if (field == "budget_exponent") o.budget_exponent = number(value, field);
    else if (field == "method") lev.method = named(parse_score_method, value);
    else if (field == "ridge") lev.ridge = number(value, field);
    else if (field == "rank_rtol") lev.rank_rtol = number(value, field);
    else if (field == "sketch") lev.sketch = named(parse_sketch_kind, value);
    else if (field == "sketch_size") lev.sketch_size = integer(value, field);
    else if (field == "gamma") lev.gamma = number(value, field);
    else if (field == "jl_columns") lev.jl_columns = integer(value, field);
    else if (field == "delta") lev.delta = number(value, field);
    else if (field == "sketch_seed") lev.seed = seed(value, field);
    else
      bad("unknown field '" + detail::printable(field) + "' (expected top_k, eps, window, sinks, probe, clusters, iterations, seed, residual, "
          "p, kernel, precision, budget_alpha, budget_exponent, method, ridge, rank_rtol, sketch, sketch_size, gamma, jl_columns, "
          "delta or sketch_seed)");
  }
  return o;
}

std::string selection_spec(const AttentionOptions& o) {
  const AttentionOptions d;  // the defaults, which the spec leaves out
  const LeverageOptions& l = o.leverage;
  std::ostringstream os;
  os << to_string(o.select);
  // The budget (top_k; the window of Select::window) as the name's value, as users write it.
  const bool takes_budget = o.select != Select::full && o.select != Select::window;
  const bool budget_named = takes_budget ? o.top_k != d.top_k : o.select == Select::window && o.window != d.window;
  if (budget_named) os << ':' << (takes_budget ? o.top_k : o.window);
  const auto field = [&](bool differs, const char* name, const auto& value) {
    if (!differs) return;
    os << '+' << name << ':';
    if constexpr (std::is_floating_point_v<std::decay_t<decltype(value)>>) {
      char text[32];  // the shortest text that reads back as the same double
      std::string number(text, static_cast<std::size_t>(std::to_chars(text, text + sizeof text, value).ptr - text));
      // '+' separates the spec's fields: an exponent is written 1e300, never 1e+300.
      if (const auto plus = number.find("e+"); plus != std::string::npos) number.erase(plus + 1, 1);
      os << number;
    } else {
      os << value;
    }
  };
  field(o.top_k != d.top_k && !(budget_named && takes_budget), "top_k", o.top_k);
  field(o.eps != d.eps, "eps", o.eps);
  field(o.window != d.window && !(budget_named && !takes_budget), "window", o.window);
  field(o.sinks != d.sinks, "sinks", o.sinks);
  field(o.probe != d.probe, "probe", o.probe);
  field(o.clusters != d.clusters, "clusters", o.clusters);
  field(o.cluster_iterations != d.cluster_iterations, "iterations", o.cluster_iterations);
  field(o.seed != d.seed, "seed", o.seed);
  field(o.residual != d.residual, "residual", o.residual);
  field(o.kernel != d.kernel, "kernel", to_string(o.kernel));
  field(o.p != d.p, "p", o.p);
  field(o.precision != d.precision, "precision", to_string(o.precision));
  field(o.budget_alpha != d.budget_alpha, "budget_alpha", o.budget_alpha);
  field(o.budget_exponent != d.budget_exponent, "budget_exponent", o.budget_exponent);
  field(l.method != d.leverage.method, "method", to_string(l.method));
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

}  // namespace levattn
