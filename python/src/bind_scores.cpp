// The binding of the leverage scores, universal sets, heavy entries and Lewis weights.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>

#include "arrays.hpp"
#include "bindings.hpp"

namespace levattn::python {
namespace {

LeverageOptions leverage_options(const std::string& method, double ridge, double rank_rtol, const std::string& sketch,
                                 index_t sketch_size, double gamma, index_t jl_columns, double delta, std::int64_t seed) {
  LeverageOptions o;
  o.method = parse_score_method(method);
  o.ridge = ridge, o.rank_rtol = rank_rtol, o.sketch = parse_sketch_kind(sketch), o.sketch_size = sketch_size;
  o.gamma = gamma, o.jl_columns = jl_columns, o.delta = delta, o.seed = seed_of(seed);
  return o;
}

}  // namespace

void bind_scores(py::module_& m) {
  py::class_<LeverageOptions>(m, "LeverageOptions", R"doc(Options of the leverage scores (exact or sketched).

LeverageOptions(method="exact", ridge=0.0, rank_rtol=1e-5, sketch="countsketch", sketch_size=0,
                gamma=0.2, jl_columns=0, delta=0.01, seed=0))doc")
      .def(py::init(&leverage_options), arg("method") = "exact", arg("ridge") = 0.0, arg("rank_rtol") = 1e-5,
           arg("sketch") = "countsketch", arg("sketch_size") = 0, arg("gamma") = 0.2, arg("jl_columns") = 0,
           arg("delta") = 0.01, arg("seed") = 0)
      .def_property_readonly("method", [](const LeverageOptions& o) { return to_string(o.method); })
      .def_readonly("ridge", &LeverageOptions::ridge)
      .def_readonly("rank_rtol", &LeverageOptions::rank_rtol)
      .def_property_readonly("sketch", [](const LeverageOptions& o) { return to_string(o.sketch); })
      .def_readonly("sketch_size", &LeverageOptions::sketch_size)
      .def_readonly("gamma", &LeverageOptions::gamma)
      .def_readonly("jl_columns", &LeverageOptions::jl_columns)
      .def_readonly("delta", &LeverageOptions::delta)
      .def_readonly("seed", &LeverageOptions::seed);
  py::class_<LeverageScores>(m, "LeverageScores", "Leverage scores (or |x|^p sensitivity bounds) of the keys.")
      .def_property_readonly("scores", [](const LeverageScores& s) { return to_array(s.scores); },
                             "tau_j, float64 (n,), each in [0, 1]")
      .def_readonly("rank", &LeverageScores::rank, "numerical rank of K; sum(scores) == rank up to rel_error_bound")
      .def_readonly("rel_error_bound", &LeverageScores::rel_error_bound)
      .def_readonly("sum_bound", &LeverageScores::sum_bound)
      .def_property_readonly("method", [](const LeverageScores& s) { return to_string(s.method); })
      .def_readonly("sketch_size", &LeverageScores::sketch_size)
      .def_readonly("failure_probability", &LeverageScores::failure_probability)
      .def("__repr__", [](const LeverageScores& s) {
        return "LeverageScores(n=" + std::to_string(s.scores.size()) + ", rank=" + std::to_string(s.rank) +
               ", method=" + to_string(s.method) + ")";
      });
  py::class_<KeyGram>(m, "KeyGram", "The float64 Gram matrix M = K^T K of the keys and its pseudo-inverse factor.")
      .def_readonly("d", &KeyGram::d)
      .def_readonly("rank", &KeyGram::rank)
      .def_readonly("ridge", &KeyGram::ridge)
      .def_property_readonly("gram", [](const KeyGram& g) { return to_array(g.gram).reshape({g.d, g.d}); }, "M, (d, d)")
      .def_property_readonly("factor", [](const KeyGram& g) { return to_array(g.factor).reshape({g.d, g.rank}); },
                             "B (d, rank) with M^+ = B B^T")
      .def_readonly("condition", &KeyGram::condition);
  py::class_<UniversalSet>(m, "UniversalSet", "A universal set of keys (U_eps or the top-k by score).")
      .def_readonly("n", &UniversalSet::n)
      .def_readonly("rank", &UniversalSet::rank)
      .def_property_readonly("indices", [](const UniversalSet& u) { return to_array(u.indices); }, "int64, ascending")
      .def_property_readonly("scores", [](const UniversalSet& u) { return to_array(u.scores); },
                             "float64, the score of each selected key")
      .def_readonly("size_bound", &UniversalSet::size_bound)
      .def_readonly("score_rel_error_bound", &UniversalSet::score_rel_error_bound)
      .def_property_readonly("method", [](const UniversalSet& u) { return to_string(u.method); })
      .def_readonly("sketch_size", &UniversalSet::sketch_size)
      .def_readonly("failure_probability", &UniversalSet::failure_probability)
      .def_readonly("ties_left_out", &UniversalSet::ties_left_out)
      .def("__len__", [](const UniversalSet& u) { return u.indices.size(); })
      .def("__repr__", [](const UniversalSet& u) {
        return "UniversalSet(size=" + std::to_string(u.indices.size()) + ", n=" + std::to_string(u.n) +
               ", rank=" + std::to_string(u.rank) + ")";
      });
  py::class_<HeavyEntries>(m, "HeavyEntries", "The eps-heavy entries of |x|^p attention, sorted by query then key.")
      .def_property_readonly("queries", [](const HeavyEntries& h) {
        std::vector<index_t> v;
        for (const auto& e : h.entries) v.push_back(e.query);
        return to_array(v);
      })
      .def_property_readonly("keys", [](const HeavyEntries& h) {
        std::vector<index_t> v;
        for (const auto& e : h.entries) v.push_back(e.key);
        return to_array(v);
      })
      .def_property_readonly("values", [](const HeavyEntries& h) {
        std::vector<double> v;
        for (const auto& e : h.entries) v.push_back(e.value);
        return to_array(v);
      }, "A_ij = |q_i.k_j|^p / sum_l |q_i.k_l|^p")
      .def_property_readonly("zero_rows", [](const HeavyEntries& h) { return to_array(h.zero_rows); })
      .def_readonly("universal_size", &HeavyEntries::universal_size)
      .def_readonly("rank", &HeavyEntries::rank)
      .def_readonly("p", &HeavyEntries::p)
      .def_readonly("normaliser", &HeavyEntries::normaliser)
      .def_readonly("samples", &HeavyEntries::samples)
      .def_readonly("gamma", &HeavyEntries::gamma)
      .def_readonly("sketch_rows", &HeavyEntries::sketch_rows)
      .def_readonly("sketch_buckets", &HeavyEntries::sketch_buckets)
      .def_readonly("candidates", &HeavyEntries::candidates)
      .def("__len__", [](const HeavyEntries& h) { return h.entries.size(); });
  py::class_<HeavyAgreement>(m, "HeavyAgreement", "How one list of heavy entries agrees with the true list.")
      .def_readonly("common", &HeavyAgreement::common)
      .def_readonly("recall", &HeavyAgreement::recall)
      .def_readonly("precision", &HeavyAgreement::precision)
      .def_readonly("max_rel_value_error", &HeavyAgreement::max_rel_value_error);
  py::class_<LewisWeights>(m, "LewisWeights", "The l_p Lewis weights of the keys.")
      .def_property_readonly("weights", [](const LewisWeights& w) { return to_array(w.weights); })
      .def_readonly("rank", &LewisWeights::rank)
      .def_readonly("p", &LewisWeights::p)
      .def_readonly("residual", &LewisWeights::residual)
      .def_readonly("iterations", &LewisWeights::iterations)
      .def_readonly("converged", &LewisWeights::converged);

  m.def("leverage_scores", [](py::handle K_, const std::optional<LeverageOptions>& lev, const py::kwargs& retired) {
    if (!retired.empty()) {
      std::string given;
      for (auto [key, value] : retired) given += (given.empty() ? "" : ", ") + py::str(key).cast<std::string>() + "=...";
      throw py::type_error("leverage_scores: the options are one LeverageOptions, leverage_scores(K, "
                           "levattn.LeverageOptions(" + given + ")); got keywords " + given);
    }
    const auto K = array_of<float>(K_, "K");
    const ConstMatrix k = matrix(K, "K");
    const LeverageOptions o = lev.value_or(LeverageOptions{});
    py::gil_scoped_release release;
    return leverage_scores(k, o);
  }, arg("K"), arg("leverage") = py::none(), R"doc(Leverage scores tau_j = k_j^T (K^T K)^+ k_j of the keys.

K: (n, d) float32 (converted if needed); leverage: a LeverageOptions (default exact). Returns
LeverageScores (scores (n,), rank, bounds). exact: float64 Gram matrix and a rank-revealing
eigendecomposition, O(n d^2), scores exact to rel_error_bound. sketch: the Gram matrix of S K
(CountSketch, SRHT or Gaussian, sketch_size rows, >= d), each score within (1 +- gamma) with
probability >= 1 - delta; reproducible by seed.)doc");
  m.def("key_gram", [](py::handle K_, const std::optional<LeverageOptions>& o) {
    const auto K = array_of<float>(K_, "K");
    const ConstMatrix k = matrix(K, "K");
    py::gil_scoped_release release;
    return key_gram(k, o.value_or(LeverageOptions{}));
  }, arg("K"), arg("leverage") = py::none(), "M = K^T K (float64, (d, d)) and B with M^+ = B B^T: O(n d^2).");
  m.def("universal_set", [](py::handle K_, std::optional<double> eps, std::optional<index_t> top_k, double p,
                            const std::optional<LeverageOptions>& lev) -> py::object {
    const auto K = array_of<float>(K_, "K");
    UniversalOptions o;
    o.eps = eps.value_or(0.0), o.top_k = top_k.value_or(0), o.p = p, o.leverage = lev.value_or(LeverageOptions{});
    const Tensor4Ref k = tensor4(K, "K");
    std::vector<UniversalSet> sets;
    {
      py::gil_scoped_release release;
      sets = universal_sets(k, o);
    }
    if (K.ndim() == 2) return py::cast(std::move(sets[0]));
    return py::cast(std::move(sets));
  }, arg("K"), arg("eps") = py::none(), py::kw_only(), arg("top_k") = py::none(), arg("p") = 2.0,
     arg("leverage") = py::none(), R"doc(The universal set of keys: U_eps = {j : tau_j >= eps} or the top_k keys by score.

K: (n, d), or (heads, n, d) / (batch, heads, n, d) for one set per pair (a list, b * heads + h
order). Give exactly one of eps in (0, 1] or top_k >= 1. p = 2: leverage scores; p != 2: |x|^p
sensitivity bounds from Lewis weights. Guarantee (exact scores): every key j with an eps-heavy
entry A_ij >= eps of x^2 (|x|^p) attention, for any query, is in U_eps, and |U_eps| <= rank / eps
(size_bound). Cost O(n d^2) per pair.)doc");
  m.def("heavy_entries", [](py::handle Q_, py::handle K_, double eps, double p, const std::string& normaliser,
                            index_t samples, double gamma, double delta, std::int64_t seed,
                            const std::optional<LeverageOptions>& lev, bool causal,
                            const std::string& search) -> py::object {
    const auto Q = array_of<float>(Q_, "Q"), K = array_of<float>(K_, "K");
    HeavyOptions o;
    o.p = p, o.samples = samples, o.gamma = gamma, o.delta = delta, o.seed = seed_of(seed);
    o.normaliser = parse_normaliser(normaliser);
    o.search = parse_heavy_search(search);
    o.leverage = lev.value_or(LeverageOptions{});
    o.causal = causal;
    if (Q.ndim() != K.ndim()) value_error("Q, K: expected arrays of the same number of dimensions");
    const Tensor4Ref q = tensor4(Q, "Q"), k = tensor4(K, "K");
    std::vector<HeavyEntries> h;
    {
      py::gil_scoped_release release;
      h = heavy_entries(q, k, eps, o);
    }
    if (Q.ndim() == 2) return py::cast(std::move(h[0]));
    return py::cast(std::move(h));
  }, arg("Q"), arg("K"), arg("eps"), py::kw_only(), arg("p") = 2.0, arg("normaliser") = "exact",
     arg("samples") = 0, arg("gamma") = 0.1, arg("delta") = 0.01, arg("seed") = 0, arg("leverage") = py::none(),
     arg("causal") = false, arg("search") = "exact",
     R"doc(Every eps-heavy entry A_ij = |q_i.k_j|^p / sum_l |q_i.k_l|^p >= eps, searched over U_eps only.

Q: (m, d), K: (n, d) (or 3-D / 4-D stacks: a list per pair). p = 2 with exact normalisers:
exact, O(n d^2 + m d^2 + m |U| d), no entry is missed (the universal set guarantee).
normaliser="sampled": r keys drawn by sensitivity, normalisers within (1 +- gamma) w.p. 1 - delta.
causal=True (p = 2, exact; m == n): the entries of causal attention, A_ij over keys j <= i,
searched over each block's causal universal set, O(n d^2 + n |C| d).
search="countsketch" (p = 2, exact normalisers): a CountSketch of the keys of U (t =
ceil(log2(m / (eps delta))) rows of ceil(64 / eps) buckets, from `seed`), candidates verified
exactly: every heavy entry found w.p. >= 1 - delta, none false (sketch_rows, sketch_buckets and
candidates report it).)doc");
  m.def("causal_universal_sets", [](py::handle K_, double eps, index_t block, const std::optional<LeverageOptions>& lev) {
    const auto K = array_of<float>(K_, "K");
    const ConstMatrix k = matrix(K, "K");
    py::gil_scoped_release release;
    return causal_universal_sets(k, eps, block, lev.value_or(LeverageOptions{}));
  }, arg("K"), arg("eps"), py::kw_only(), arg("block") = kCausalBlock, arg("leverage") = py::none(),
     R"doc(The causal universal sets of K (n, d): per block r of `block` queries, the keys before it whose
prefix leverage score at the block's start is >= eps, then the block's own keys (ascending).
Returned as the Selection of one pair (causal, segment = block, shared_keys[r] the set of block r).
Guarantee (x^2): every causal entry A_ij >= eps (j <= i) has j in the set of i's block.
O(n d^2 + (n / block)(d^3 + |C| d^2)), |C| <= about d / eps.)doc");
  m.def("heavy_entries_brute_force", [](py::handle Q_, py::handle K_, double eps) {
    const auto Q = array_of<float>(Q_, "Q"), K = array_of<float>(K_, "K");
    const ConstMatrix q = matrix(Q, "Q"), k = matrix(K, "K");
    py::gil_scoped_release release;
    return heavy_entries_brute_force(q, k, eps);
  }, arg("Q"), arg("K"), arg("eps"), "The x^2 heavy entries by scanning every (query, key) pair: O(m n d), the oracle.");
  m.def("compare_heavy_entries", &compare_heavy_entries, arg("found"), arg("truth"),
        "Recall, precision and value error of `found` against `truth` (both HeavyEntries).");
  m.def("lewis_weights", [](py::handle K_, double p, index_t max_iterations, double tolerance, double rank_rtol) {
    const auto K = array_of<float>(K_, "K");
    LewisOptions o;
    o.p = p, o.max_iterations = max_iterations, o.tolerance = tolerance, o.rank_rtol = rank_rtol;
    const ConstMatrix k = matrix(K, "K");
    py::gil_scoped_release release;
    return lewis_weights(k, o);
  }, arg("K"), arg("p") = 2.0, py::kw_only(), arg("max_iterations") = 1000, arg("tolerance") = 1e-10,
     arg("rank_rtol") = 1e-5, R"doc(The l_p Lewis weights w of K (n, d): w_j = (k_j^T (K^T W^(1-2/p) K)^+ k_j)^(p/2).

Fixed-point iteration (p < 4) or its damped form, each step O(n d^2); sum(w) = rank.)doc");
  m.def("sensitivity_bounds", [](py::handle K_, double p, const std::optional<LeverageOptions>& lev) {
    const auto K = array_of<float>(K_, "K");
    const ConstMatrix k = matrix(K, "K");
    py::gil_scoped_release release;
    return sensitivity_bounds(k, p, lev.value_or(LeverageOptions{}));
  }, arg("K"), arg("p") = 2.0, arg("leverage") = py::none(), R"doc(Upper bounds on the |x|^p sensitivities of the keys.

p = 2: the leverage scores (exact or sketched by `leverage`); p != 2: from Lewis weights,
s_j <= d^max(0, p/2 - 1) w_j. Returns LeverageScores.)doc");
}

}  // namespace levattn::python
