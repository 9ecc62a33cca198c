// The binding of attention, selections, the evaluator and the PyTorch op's entry points: arrays in
// and out, the selection as its spec string, errors mapped to Python exceptions.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <optional>
#include <string>

#include "arrays.hpp"
#include "bindings.hpp"

namespace levattn::python {
namespace {

// The options of a call: its selection spec (parse_selection), plus the call's scale and causality.
AttentionOptions options_of(const std::string& select, std::optional<double> scale, bool causal) {
  AttentionOptions o = parse_selection(select);
  if (scale) {
    if (!std::isfinite(*scale)) value_error("scale: expected a finite number or None");
    o.scale = *scale;
  }
  o.causal = causal;
  return o;
}

// The keywords a selection was given as before it became one spec string (select="leverage",
// top_k=32, window=4): refused with the spec that says the same ("leverage:32+window:4") when
// they make one, so that old code fails at once with its new spelling.
[[noreturn]] void refuse_selection_keywords(const std::string& function, const std::string& select,
                                            const py::dict& given) {
  std::string names, spec;
  try {
    AttentionOptions o = parse_selection(select);
    for (auto [key, value] : given) {
      const std::string name = py::str(key);
      names += (names.empty() ? "" : ", ") + name;
      if (value.is_none()) continue;
      if (name == "top_k") o.top_k = value.cast<index_t>();
      else if (name == "eps") o.eps = value.cast<double>();
      else if (name == "window") o.window = value.cast<index_t>();
      else if (name == "sinks") o.sinks = value.cast<index_t>();
      else if (name == "kernel") o.kernel = parse_kernel(value.cast<std::string>());
      else if (name == "p") o.p = value.cast<double>();
      else if (name == "seed") o.seed = value.cast<std::uint64_t>();
      else if (name == "budget_alpha") o.budget_alpha = value.cast<double>();
      else if (name == "budget_exponent") o.budget_exponent = value.cast<double>();
      else if (name == "leverage") o.leverage = value.cast<LeverageOptions>();
      else if (name == "cluster") {  // the settings object of old: clusters, probe, iterations
        const auto field = [&](const char* f, index_t fallback) {
          if (py::isinstance<py::dict>(value)) return value.cast<py::dict>().contains(f) ? value[f].cast<index_t>() : fallback;
          return py::hasattr(value, f) ? value.attr(f).cast<index_t>() : fallback;
        };
        o.clusters = field("clusters", o.clusters), o.probe = field("probe", o.probe);
        o.cluster_iterations = field("iterations", o.cluster_iterations);
      } else {
        throw py::type_error(function + "() got an unexpected keyword argument '" + name + "'");
      }
    }
    spec = selection_spec(o);
  } catch (const py::type_error&) {
    throw;
  } catch (const std::exception&) {
    spec.clear();  // the old keywords do not make a valid spec: name the form only
  }
  throw py::type_error(function + "(): " + names + " are not keywords any more: a selection is one spec string, " +
                       (spec.empty() ? std::string("select=\"NAME[:BUDGET][+FIELD:VALUE...]\"")
                                     : "select=\"" + spec + "\"") +
                       " (levattn.parse_selection's spelling, as `levattn attend --select` takes it)");
}

// The shape of q (.., m, d), k (.., n, d), v (.., n, dv) with the same leading dimensions, but
// for k and v's heads, which may divide q's (grouped-query attention).
AttentionShape attention_shape(const py::array& q, const py::array& k, const py::array& v) {
  const Dims dq = dims(q, "q"), dk = dims(k, "k"), dv = dims(v, "v");
  if (q.ndim() != k.ndim() || q.ndim() != v.ndim()) value_error("q, k, v: expected arrays of the same number of dimensions");
  if (dk.batch != dq.batch || dk.heads < 1 || dq.heads % dk.heads != 0 || dv.batch != dq.batch ||
      dv.heads != dk.heads || dk.cols != dq.cols || dv.rows != dk.rows)
    value_error("q, k, v: expected shapes (.., m, d), (.., n, d), (.., n, dv) with the same leading dimensions (k and v "
                "may have fewer heads, dividing q's), got " + shape_text(q) + ", " + shape_text(k) + ", " + shape_text(v));
  return {dq.batch, dq.heads, dq.rows, dk.rows, dq.cols, dv.cols, dk.heads};
}

// (batch, heads, m, n, d, dv, kv_heads) as Python passes it.
AttentionShape shape_of(const std::array<index_t, 7>& s) { return {s[0], s[1], s[2], s[3], s[4], s[5], s[6]}; }

// Attention over a selection in float T (float32 or float64): out (.., m, dv) and stat (.., m).
template <class T>
py::tuple forward(py::handle q_, py::handle k_, py::handle v_, const Selection& sel, const AttentionOptions& o) {
  const auto q = array_of<T>(q_, "q"), k = array_of<T>(k_, "k"), v = array_of<T>(v_, "v");
  const AttentionShape sh = attention_shape(q, k, v);
  const Dims dq = dims(q, "q"), dv = dims(v, "v");
  py::array_t<T> out(shape_like(q, dq.rows, dv.cols));
  std::vector<py::ssize_t> stat_shape(q.shape(), q.shape() + q.ndim() - 1);
  py::array_t<T> stat(stat_shape);
  {
    py::gil_scoped_release release;
    selected_attention_forward<T>(sh, sel, o, q.data(), k.data(), v.data(), out.mutable_data(), stat.mutable_data());
  }
  return py::make_tuple(out, stat);
}

template <class T>
py::tuple backward(py::handle q_, py::handle k_, py::handle v_, py::handle out_, py::handle stat_, py::handle dout_,
                   const Selection& sel, const AttentionOptions& o, bool need_dq, bool need_dk, bool need_dv) {
  const auto q = array_of<T>(q_, "q"), k = array_of<T>(k_, "k"), v = array_of<T>(v_, "v");
  const auto out = array_of<T>(out_, "out"), stat = array_of<T>(stat_, "stat"), dout = array_of<T>(dout_, "grad_out");
  const AttentionShape sh = attention_shape(q, k, v);
  const auto rows_of = [](const py::array& a) { return a.size(); };
  const py::ssize_t outs = static_cast<py::ssize_t>(sh.batch * sh.heads * sh.m);
  if (rows_of(out) != outs * sh.dv || rows_of(dout) != outs * sh.dv || rows_of(stat) != outs)
    value_error("attention backward: out, stat and grad_out do not match the shapes of q and v");
  py::array_t<T> gq, gk, gv;
  if (need_dq) gq = py::array_t<T>(std::vector<py::ssize_t>(q.shape(), q.shape() + q.ndim()));
  if (need_dk) gk = py::array_t<T>(std::vector<py::ssize_t>(k.shape(), k.shape() + k.ndim()));
  if (need_dv) gv = py::array_t<T>(std::vector<py::ssize_t>(v.shape(), v.shape() + v.ndim()));
  {
    py::gil_scoped_release release;
    selected_attention_backward<T>(sh, sel, o, q.data(), k.data(), v.data(), out.data(), stat.data(), dout.data(),
                                   need_dq ? gq.mutable_data() : nullptr, need_dk ? gk.mutable_data() : nullptr,
                                   need_dv ? gv.mutable_data() : nullptr);
  }
  const auto opt = [](bool need, py::array_t<T>& a) -> py::object { return need ? py::object(a) : py::none(); };
  return py::make_tuple(opt(need_dq, gq), opt(need_dk, gk), opt(need_dv, gv));
}

// The op's key mask: None, or (batch, n) of bool / uint8 (nonzero: the key may be attended).
std::optional<CArray<std::uint8_t>> key_mask_of(py::handle mask, const AttentionShape& sh) {
  if (mask.is_none()) return std::nullopt;
  auto a = array_of<std::uint8_t>(mask, "key_mask");
  if (a.ndim() != 2 || a.shape(0) != static_cast<py::ssize_t>(sh.batch) || a.shape(1) != static_cast<py::ssize_t>(sh.n))
    value_error("key_mask: expected shape (batch, n) = (" + std::to_string(sh.batch) + ", " + std::to_string(sh.n) +
                "), got " + shape_text(a));
  return a;
}

// The selection arrays of the op: key_segments (.., n) and query_keys (.., m, top_k) int64, the
// residual part's keys (.., blocks, residual) int64 and weights (.., blocks) float64 (1 without
// one), blocks = Selection::residual_blocks().
py::tuple selection_arrays(const Selection& sel, const py::array& q, const py::array& k) {
  std::vector<py::ssize_t> lead(q.shape(), q.shape() + q.ndim() - 2);
  auto with = [&](std::initializer_list<py::ssize_t> tail) {
    std::vector<py::ssize_t> s = lead;
    s.insert(s.end(), tail);
    return s;
  };
  const std::vector<index_t> last = key_segments(sel);
  py::array_t<std::int64_t> segs(with({k.shape(k.ndim() - 2)}));
  std::copy(last.begin(), last.end(), segs.mutable_data());
  py::array_t<std::int64_t> own(with({static_cast<py::ssize_t>(sel.m), static_cast<py::ssize_t>(sel.top_k)}));
  std::copy(sel.query_keys.begin(), sel.query_keys.end(), own.mutable_data());
  const auto blocks = static_cast<py::ssize_t>(sel.residual_blocks());
  py::array_t<std::int64_t> sampled(with({blocks, static_cast<py::ssize_t>(sel.residual)}));
  std::copy(sel.residual_keys.begin(), sel.residual_keys.end(), sampled.mutable_data());
  py::array_t<double> weight(with({blocks}));
  if (sel.residual > 0) std::copy(sel.residual_weight.begin(), sel.residual_weight.end(), weight.mutable_data());
  else std::fill_n(weight.mutable_data(), weight.size(), 1.0);
  return py::make_tuple(segs, own, sampled, weight);
}

// The selection behind the op's arrays, checked against the layout of these shapes, with its key mask.
Selection selection_of_arrays(py::handle segs_, py::handle own_, py::handle sampled_, py::handle weight_, py::handle mask,
                              const AttentionShape& sh, const AttentionOptions& o) {
  const Selection layout = selection_layout(sh, o);
  const auto key_mask = key_mask_of(mask, sh);
  const auto segs = array_of<std::int64_t>(segs_, "key_segments"), own = array_of<std::int64_t>(own_, "query_keys");
  const auto sampled = array_of<std::int64_t>(sampled_, "residual_keys");
  const auto weight = array_of<double>(weight_, "residual_weight");
  if (segs.size() != static_cast<py::ssize_t>(layout.pairs() * layout.n))
    value_error("key_segments: expected (.., n) = " + std::to_string(layout.pairs() * layout.n) + " entries, got " +
                std::to_string(segs.size()));
  if (own.size() != static_cast<py::ssize_t>(layout.pairs() * layout.m * layout.top_k))
    value_error("query_keys: expected (.., m, " + std::to_string(layout.top_k) + ") = " +
                std::to_string(layout.pairs() * layout.m * layout.top_k) + " entries, got " + std::to_string(own.size()));
  const index_t blocks = layout.pairs() * layout.residual_blocks();
  if (sampled.size() != static_cast<py::ssize_t>(blocks * layout.residual))
    value_error("residual_keys: expected (.., " + std::to_string(layout.residual_blocks()) + ", " +
                std::to_string(layout.residual) + ") = " + std::to_string(blocks * layout.residual) + " entries, got " +
                std::to_string(sampled.size()));
  if (weight.size() != static_cast<py::ssize_t>(blocks))
    value_error("residual_weight: expected (.., " + std::to_string(layout.residual_blocks()) + ") = " +
                std::to_string(blocks) + " entries, got " + std::to_string(weight.size()));
  static_assert(sizeof(index_t) == sizeof(std::int64_t));
  Selection sel = selection_from_arrays(layout, reinterpret_cast<const index_t*>(segs.data()),
                                        reinterpret_cast<const index_t*>(own.data()),
                                        reinterpret_cast<const index_t*>(sampled.data()), weight.data());
  if (key_mask) sel.key_mask.assign(key_mask->data(), key_mask->data() + key_mask->size());
  return sel;
}

// The op's forward in float T: the selection (made from float32 q and k, as attention() makes
// it), attention over it, and the selection as arrays: (out, stat, key_segments, query_keys,
// residual_keys, residual_weight).
template <class T>
py::tuple op_forward(py::handle q_, py::handle k_, py::handle v_, py::handle mask, AttentionOptions o) {
  const auto q = array_of<T>(q_, "q"), k = array_of<T>(k_, "k"), v = array_of<T>(v_, "v");
  const AttentionShape sh = attention_shape(q, k, v);
  const auto q32 = array_of<float>(q, "q"), k32 = array_of<float>(k, "k");
  const auto key_mask = key_mask_of(mask, sh);
  if (key_mask) o.key_mask = key_mask->data();
  Selection sel;
  {
    py::gil_scoped_release release;
    sel = select_keys(tensor4(q32, "q"), tensor4(k32, "k"), o);
  }
  py::tuple out_stat = forward<T>(q, k, v, sel, o);
  py::tuple arrays = selection_arrays(sel, q, k);
  return py::make_tuple(out_stat[0], out_stat[1], arrays[0], arrays[1], arrays[2], arrays[3]);
}

// One row of the evaluator (evaluate, selection_metrics) as a dict.
py::dict evaluation_dict(const Evaluation& e) {
  py::dict d;
  d["pair"] = e.pair, d["selection"] = e.selection, d["scale"] = e.scale, d["keys_per_query"] = e.keys_per_query;
  d["softmax_mass"] = e.softmax_mass, d["kernel_mass"] = e.kernel_mass;
  d["kernel_heavy_recall"] = e.kernel_heavy_recall, d["kernel_heavy"] = e.kernel_heavy;
  d["output_error"] = e.output_error;
  d["x2_heavy_recall"] = e.x2_heavy_recall, d["x2_heavy"] = e.x2_heavy;
  d["power_heavy_recall"] = e.power_heavy_recall, d["power_heavy"] = e.power_heavy;
  d["scores_tied"] = e.scores_tied;
  return d;
}

}  // namespace

void bind_attention(py::module_& m) {
  py::class_<AttentionResult>(m, "AttentionResult", "What attention() did besides writing the output.")
      .def_readonly("selection", &AttentionResult::selection,
                    "the keys every query attended (a Selection, as select_keys gives it)")
      .def_property_readonly("shared_sizes", [](const AttentionResult& r) { return to_array(r.shared_sizes); })
      .def_readonly("top_k", &AttentionResult::top_k)
      .def_readonly("mean_keys_per_query", &AttentionResult::mean_keys_per_query)
      .def_readonly("empty_rows", &AttentionResult::empty_rows)
      .def_readonly("short_queries", &AttentionResult::short_queries,
                    "cluster: queries whose probed clusters held fewer than top_k keys")
      .def_readonly("seconds_selection", &AttentionResult::seconds_selection)
      .def_readonly("seconds_attention", &AttentionResult::seconds_attention);
  py::class_<Selection>(m, "Selection", R"doc(The keys each query of every (batch, head) pair attends.

One of three forms: all_keys (select full); shared_keys per pair plus a window band (leverage,
random, window; sinks are in the shared keys); or query_keys (pairs, m, top_k) (select topk).
With +residual:R, also residual_keys (pairs, residual_blocks, R) sampled from the rest of each
block of 256 queries, attended (where no other part gives a query the key) with the weight
residual_weight (pairs, residual_blocks).
causal: each query attends keys j <= i only; segment > 0 (causal leverage): shared_keys holds one
set per (pair, block of `segment` queries), at pair * blocks + block.)doc")
      .def_readonly("batch", &Selection::batch)
      .def_readonly("causal", &Selection::causal)
      .def_readonly("segment", &Selection::segment)
      .def_readonly("heads", &Selection::heads)
      .def_readonly("m", &Selection::m)
      .def_readonly("n", &Selection::n)
      .def_readonly("all_keys", &Selection::all_keys)
      .def_readonly("window", &Selection::window)
      .def_readonly("top_k", &Selection::top_k)
      .def_property_readonly("shared_keys", [](const Selection& s) {
        py::list l;
        for (const auto& k : s.shared_keys) l.append(to_array(k));
        return l;
      })
      .def_property_readonly("query_keys", [](const Selection& s) {
        return to_array(s.query_keys).reshape({s.pairs(), s.m, s.top_k});
      })
      .def_readonly("residual", &Selection::residual, "keys sampled from the rest per block of queries, 0: none")
      .def_property_readonly("residual_blocks", &Selection::residual_blocks,
                             "blocks of queries (256 per segment) that share one draw of their rest")
      .def_property_readonly("residual_keys", [](const Selection& s) -> py::object {
        if (s.residual > 0 && s.residual_keys.empty()) return py::none();  // a layout: no keys yet
        return to_array(s.residual_keys).reshape({s.pairs(), s.residual_blocks(), s.residual});
      }, "(pairs, residual_blocks, residual) int64: each block's keys sampled from its rest, ascending, -1 for an "
         "unused slot")
      .def_property_readonly("residual_weight", [](const Selection& s) -> py::object {
        if (s.residual_weight.empty()) return py::none();
        return to_array(s.residual_weight).reshape({s.pairs(), s.residual_blocks()});
      }, "(pairs, residual_blocks) float64: the weight |U| / r of each block's sampled keys; None without them")
      .def_property_readonly("key_mask", [](const Selection& s) -> py::object {
        if (s.key_mask.empty()) return py::none();
        py::array_t<std::uint8_t> a({s.batch, s.n});
        std::copy(s.key_mask.begin(), s.key_mask.end(), a.mutable_data());
        return a;
      }, "(batch, n) uint8, 0 for a key no query attends (padding); None: every key")
      .def("keys_per_query", [](const Selection& s) {
        // |S_i| per query, (pairs, m): for inspection and for counting the work of a selection.
        return to_array(s.keys_per_query()).reshape({s.pairs(), s.m});
      });

  m.def("adaptive_budget", &adaptive_budget, arg("n"), arg("alpha"), arg("exponent"),
        "ceil(alpha * n^exponent), clamped to [1, n]: the n^C-sparse key budget.");
  m.def("attention", [](py::handle q_, py::handle k_, py::handle v_, const std::string& select,
                        std::optional<double> scale, bool causal, bool return_result, const py::kwargs& retired) -> py::object {
    if (!retired.empty()) refuse_selection_keywords("attention", select, retired);
    const auto q = array_of<float>(q_, "q"), k = array_of<float>(k_, "k"), v = array_of<float>(v_, "v");
    if (q.ndim() != k.ndim() || q.ndim() != v.ndim()) value_error("q, k, v: expected arrays of the same number of dimensions");
    AttentionOptions o = options_of(select, scale, causal);
    o.return_selection = return_result;
    const Tensor4Ref Q = tensor4(q, "q"), K = tensor4(k, "k"), V = tensor4(v, "v");
    py::array_t<float> out(shape_like(q, q.shape(q.ndim() - 2), v.shape(v.ndim() - 1)));
    AttentionResult r;
    {
      py::gil_scoped_release release;
      r = attention(Q, K, V, out.mutable_data(), o);
    }
    if (!return_result) return out;
    return py::make_tuple(out, std::move(r));
  }, arg("q"), arg("k"), arg("v"), arg("select") = "full", py::kw_only(), arg("scale") = py::none(),
     arg("causal") = false, arg("return_result") = false,
     R"doc(Attention of each query over its selection of keys: O = D^-1 f(scale Q K_S^T) V_S (float32).

q (.., m, d), k (.., n, d), v (.., n, dv) with .. = (), (heads,) or (batch, heads); returns out
(.., m, dv), and with return_result=True (out, AttentionResult).

select: the selection spec, NAME[:BUDGET][+FIELD:VALUE...] (levattn.parse_selection; the same text
as `levattn attend --select`): "full" (dense reference, no n x n buffer), "leverage:32" (top 32 keys
by leverage score; "leverage+eps:0.05" the universal set U_eps), "topk:32" (per query its top keys:
the oracle, O(m n d)), "random:32" (+seed:S), "window:16" (keys |i - j| <= 16), "cluster:32" (per
query its top keys among its probed k-means clusters; +probe, +clusters, +iterations), each with
+window:W and +sinks:S added, +kernel:poly+p:4 for |s|^p attention, +budget_alpha/+budget_exponent
for the n^C budget and the leverage score fields (+method:sketch, +sketch_size, ...).
scale: the logit scale (None: 1/sqrt(d) for softmax, 1 for poly). causal=True: query i sees keys
0 .. i only (m == n), in every selection; leverage then takes eps and uses each block's causal
universal set (every eps-heavy causal x^2 entry kept). Cost per pair: leverage
O(n d^2 + m |S| (d + dv)). The keywords of old (top_k=, window=, ...) are a TypeError giving their spec.)doc");
  m.def("select_keys", [](py::handle q_, py::handle k_, const std::string& select, std::optional<double> scale,
                          bool causal, const py::kwargs& retired) {
    if (!retired.empty()) refuse_selection_keywords("select_keys", select, retired);
    const auto q = array_of<float>(q_, "q"), k = array_of<float>(k_, "k");
    if (q.ndim() != k.ndim()) value_error("q, k: expected arrays of the same number of dimensions");
    const AttentionOptions o = options_of(select, scale, causal);
    const Tensor4Ref Q = tensor4(q, "q"), K = tensor4(k, "k");
    py::gil_scoped_release release;
    return select_keys(Q, K, o);
  }, arg("q"), arg("k"), arg("select"), py::kw_only(), arg("scale") = py::none(), arg("causal") = false,
     "The Selection attention() makes for the spec `select` (same keys), without attending. q (.., m, d), k (.., n, d) float32.");
  m.def("selection_metrics", [](py::handle q_, py::handle k_, py::handle v_, py::handle approx_, const Selection& sel,
                                const std::string& kernel, double p, std::optional<double> scale, double heavy_eps) {
    const auto q = array_of<float>(q_, "q"), k = array_of<float>(k_, "k"), v = array_of<float>(v_, "v");
    const auto approx = array_of<float>(approx_, "approx");
    KernelOptions ko;
    ko.kernel = parse_kernel(kernel), ko.p = p, ko.scale = scale.value_or(kNaN);
    const ConstMatrix Q = matrix(q, "q"), K = matrix(k, "k"), V = matrix(v, "v");
    if (approx.size() != static_cast<py::ssize_t>(Q.rows * V.cols)) value_error("approx: expected shape (m, dv)");
    EvaluateOptions eo;
    eo.heavy_eps = heavy_eps;
    Evaluation e;
    {
      py::gil_scoped_release release;
      e = selection_metrics(Q, K, V, approx.data(), ko, sel, eo);
    }
    return evaluation_dict(e);
  }, arg("q"), arg("k"), arg("v"), arg("approx"), arg("selection"), py::kw_only(), arg("kernel") = "softmax",
     arg("p") = 2.0, arg("scale") = py::none(), arg("heavy_eps") = 0.05,
     R"doc(One head's selection against full attention of its kernel, by the evaluator of evaluate().

q (m, d), k (n, d), v (n, dv); approx (m, dv) and selection from attention(..., return_result=True)
(result.selection) with the same kernel, p and scale. Returns the dict of an evaluate() row (no
selection name) with kernel_mass and kernel_heavy_recall (the selection's share of the kernel's
full attention weights and of its entries >= heavy_eps) besides the softmax, x^2 and |x|^4
figures. Cost O(m n (d + dv)): the full attention rows block by block (an evaluation tool).)doc");
  m.def("evaluate", [](py::handle q_, py::handle k_, py::handle v_, const std::vector<std::string>& selections,
                       double heavy_eps, double p, std::optional<double> scale) {
    const auto q = array_of<float>(q_, "q"), k = array_of<float>(k_, "k"), v = array_of<float>(v_, "v");
    if (q.ndim() != k.ndim() || q.ndim() != v.ndim()) value_error("q, k, v: expected arrays of the same number of dimensions");
    std::vector<AttentionOptions> sel;
    for (const std::string& spec : selections) sel.push_back(parse_selection(spec));
    EvaluateOptions eo;
    eo.heavy_eps = heavy_eps, eo.p = p;
    if (scale) eo.scale = *scale;
    const Tensor4Ref Q = tensor4(q, "q"), K = tensor4(k, "k"), V = tensor4(v, "v");
    std::vector<Evaluation> rows;
    {
      py::gil_scoped_release release;
      rows = evaluate(Q, K, V, sel, eo);
    }
    py::list out;
    for (const Evaluation& e : rows) out.append(evaluation_dict(e));
    return out;
  }, arg("q"), arg("k"), arg("v"), arg("selections"), py::kw_only(), arg("heavy_eps") = 0.05, arg("p") = 4.0,
     arg("scale") = py::none(),
     R"doc(How well each selection fits these attention heads: one dict per (pair, selection).

q (.., m, d), k (.., n, d), v (.., n, dv); selections: specs as `levattn evaluate --select` takes
them ("leverage:32", "leverage+eps:0.05+window:4", "topk:32", "cluster:32", "window:16", ...).
Each row: pair, selection, keys_per_query, softmax_mass (mean softmax mass inside the selection),
kernel_mass / kernel_heavy_recall / kernel_heavy (the same under the selection's own kernel), output_error (||O_S - O_full|| / ||O_full||), x2_heavy_recall / power_heavy_recall (share of the
entries >= heavy_eps of x^2 and |x|^p attention whose key is selected) with their counts, and
scores_tied (all leverage scores equal: a leverage top-k is then a tie-break). scale: the logit
scale of every selection without one and of the full attention it is compared with (None: the
kernel's default, 1/sqrt(d) for softmax; 1 for queries that already carry their scale). Rows
name the seed of random and cluster, cluster's probe as used, and the scale. O(m n d) per pair.)doc");
  m.def("parse_selection", [](const std::string& spec) { return selection_spec(parse_selection(spec)); }, arg("spec"),
        R"doc(The canonical form of a selection spec (ValueError naming the spec when it does not parse).

"leverage+window:4+top_k:32" -> "leverage:32+window:4": the budget as the name's value, the other
fields that differ from their defaults in a fixed order. Equal selections have equal canonical specs.)doc");
  m.def("attention_forward", [](py::handle q, py::handle k, py::handle v, const Selection& sel, const std::string& kernel,
                                double p, std::optional<double> scale) {
    AttentionOptions o;
    o.kernel = parse_kernel(kernel), o.p = p, o.scale = scale.value_or(kNaN);
    const py::array a = py::array::ensure(q);
    if (a && a.dtype().kind() == 'f' && a.dtype().itemsize() == 8) return forward<double>(q, k, v, sel, o);
    return forward<float>(q, k, v, sel, o);
  }, arg("q"), arg("k"), arg("v"), arg("selection"), arg("kernel") = "softmax", arg("p") = 2.0, arg("scale") = py::none(),
     R"doc(Attention over a fixed Selection, differentiable: returns (out (.., m, dv), stat (.., m)).

float64 q computes in float64 (k, v converted to it), else float32. stat_i = log sum_j exp(g(s_ij))
with g(s) = s (softmax) or p log|s| (poly); +inf for a query with no key (its out is 0).
Cost O(m |S| (d + dv)), no n x n buffer.)doc");
  m.def("selection_layout", [](const std::string& spec, std::optional<double> scale, bool causal,
                               const std::array<index_t, 7>& shape) {
    return selection_layout(shape_of(shape), options_of(spec, scale, causal));
  }, arg("spec"), arg("scale"), arg("causal"), arg("shape"),
     R"doc(The data-independent part of the Selection of a call: shape = (batch, heads, m, n, d, dv, kv_heads).

Its top_k, residual, window, segment, all_keys and causal are those select_keys gives; no keys. O(1).)doc");
  m.def("refuse_selection_keywords", [](const std::string& function, const std::string& select, const py::dict& given) {
    refuse_selection_keywords(function, select, given);
  }, arg("function"), arg("select"), arg("given"),
     "Raises the TypeError that gives the spec of a selection given as keywords of old (for levattn.torch).");
  m.def("op_forward", [](py::handle q, py::handle k, py::handle v, py::handle key_mask, const std::string& spec,
                         std::optional<double> scale, bool causal) {
    const AttentionOptions o = options_of(spec, scale, causal);
    const py::array a = py::array::ensure(q);
    if (a && a.dtype().kind() == 'f' && a.dtype().itemsize() == 8) return op_forward<double>(q, k, v, key_mask, o);
    return op_forward<float>(q, k, v, key_mask, o);
  }, arg("q"), arg("k"), arg("v"), arg("key_mask"), arg("spec"), arg("scale"), arg("causal"),
     R"doc(levattn.torch's forward: (out (.., m, dv), stat (.., m), key_segments (.., n), query_keys (.., m, top_k),
residual_keys (.., blocks, residual), residual_weight (.., blocks)).

The selection of spec (made from q and k rounded to float32; key_mask: None or (batch, n), 0 for a
padding key, never selected nor attended), attention over it in q's float type
(float64 or float32) and the selection as fixed-size int64 arrays (key_segments: the last query
segment whose shared set holds each key, -1 for none; query_keys: each query's own keys, -1 for
an unused slot; residual_keys and residual_weight: the keys sampled from the rest of each block
of queries and their weight, 1 without a residual part). Cost: the selection's plus O(m |S| (d + dv)).)doc");
  m.def("op_backward", [](py::handle q, py::handle k, py::handle v, py::handle out, py::handle stat, py::handle dout,
                          py::handle segs, py::handle own, py::handle sampled, py::handle weight, py::handle key_mask,
                          const std::string& spec, std::optional<double> scale, bool causal, bool need_dq, bool need_dk,
                          bool need_dv) {
    const AttentionOptions o = options_of(spec, scale, causal);
    const auto qa = array_of<float>(q, "q"), ka = array_of<float>(k, "k"), va = array_of<float>(v, "v");
    const Selection sel = selection_of_arrays(segs, own, sampled, weight, key_mask, attention_shape(qa, ka, va), o);
    const py::array a = py::array::ensure(q);
    if (a && a.dtype().kind() == 'f' && a.dtype().itemsize() == 8)
      return backward<double>(q, k, v, out, stat, dout, sel, o, need_dq, need_dk, need_dv);
    return backward<float>(q, k, v, out, stat, dout, sel, o, need_dq, need_dk, need_dv);
  }, arg("q"), arg("k"), arg("v"), arg("out"), arg("stat"), arg("grad_out"), arg("key_segments"), arg("query_keys"),
     arg("residual_keys"), arg("residual_weight"), arg("key_mask"), arg("spec"), arg("scale"), arg("causal"),
     arg("need_dq") = true, arg("need_dk") = true,
     arg("need_dv") = true,
     "levattn.torch's backward: (dq, dk, dv) over the selection of op_forward's arrays, None where not needed.");
  m.def("selection_from_arrays", [](py::handle segs, py::handle own, py::handle sampled, py::handle weight,
                                    py::handle key_mask, const std::string& spec, std::optional<double> scale,
                                    bool causal, const std::array<index_t, 7>& shape) {
    return selection_of_arrays(segs, own, sampled, weight, key_mask, shape_of(shape), options_of(spec, scale, causal));
  }, arg("key_segments"), arg("query_keys"), arg("residual_keys"), arg("residual_weight"), arg("key_mask"),
     arg("spec"), arg("scale"), arg("causal"), arg("shape"),
     "The Selection behind op_forward's arrays for shape (batch, heads, m, n, d, dv, kv_heads).");
  m.def("attention_backward", [](py::handle q, py::handle k, py::handle v, py::handle out, py::handle stat, py::handle dout,
                                 const Selection& sel, const std::string& kernel, double p, std::optional<double> scale,
                                 bool need_dq, bool need_dk, bool need_dv) {
    AttentionOptions o;
    o.kernel = parse_kernel(kernel), o.p = p, o.scale = scale.value_or(kNaN);
    const py::array a = py::array::ensure(q);
    if (a && a.dtype().kind() == 'f' && a.dtype().itemsize() == 8)
      return backward<double>(q, k, v, out, stat, dout, sel, o, need_dq, need_dk, need_dv);
    return backward<float>(q, k, v, out, stat, dout, sel, o, need_dq, need_dk, need_dv);
  }, arg("q"), arg("k"), arg("v"), arg("out"), arg("stat"), arg("grad_out"), arg("selection"), arg("kernel") = "softmax",
     arg("p") = 2.0, arg("scale") = py::none(), arg("need_dq") = true, arg("need_dk") = true, arg("need_dv") = true,
     R"doc(Gradients (dq, dk, dv) of sum(grad_out * out) for out = attention_forward(...), None where not needed.

Recomputes the selected logits from q, k and stat by tiles (FlashAttention-2 style); dK and dV
are summed in a fixed order (independent of the thread count). Cost: 7 tile products against the forward's 2 (2.5-4x its time).)doc");
}

}  // namespace levattn::python
