// levattn._core: the Python binding of the C++ library, a thin layer: arrays in and out, option
// structs from keywords, errors mapped to Python exceptions. Every computation is the library's
// and runs with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string>

#include "levattn/levattn.hpp"

namespace py = pybind11;
using namespace levattn;

namespace {

using py::arg;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <class T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

// obj as a C-contiguous array of T: taken as it is when it already is one, else converted
// (any numeric array-like); anything else is a ValueError naming the argument.
template <class T>
CArray<T> array_of(py::handle obj, const char* name) {
  if (obj.is_none()) value_error(std::string(name) + ": expected an array, got None");
  py::array a = py::array::ensure(obj);
  if (!a) value_error(std::string(name) + ": expected an array-like of numbers");
  const char kind = a.dtype().kind();
  if (kind != 'f' && kind != 'i' && kind != 'u' && kind != 'b')
    value_error(std::string(name) + ": expected real numbers, got dtype " + py::str(a.dtype()).cast<std::string>());
  CArray<T> c = CArray<T>::ensure(a);
  if (!c) value_error(std::string(name) + ": cannot be converted to a contiguous array");
  return c;
}

std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A 2-D (rows, cols) array as a matrix.
ConstMatrix matrix(const CArray<float>& a, const char* name) {
  if (a.ndim() != 2) value_error(std::string(name) + ": expected a 2-D (rows, columns) array, got shape " + shape_text(a));
  return {a.data(), static_cast<index_t>(a.shape(0)), static_cast<index_t>(a.shape(1))};
}

// (n, d), (heads, n, d) or (batch, heads, n, d), as the library's batched entry points take.
struct Dims {
  index_t batch = 1, heads = 1, rows = 0, cols = 0;
};
Dims dims(const py::array& a, const char* name) {
  const auto nd = a.ndim();
  if (nd < 2 || nd > 4)
    value_error(std::string(name) + ": expected a 2-D (n, d), 3-D (heads, n, d) or 4-D (batch, heads, n, d) array, got shape " +
                shape_text(a));
  Dims d;
  d.rows = a.shape(nd - 2), d.cols = a.shape(nd - 1);
  if (nd >= 3) d.heads = a.shape(nd - 3);
  if (nd == 4) d.batch = a.shape(0);
  return d;
}
template <class T>
Tensor4Ref tensor4(const CArray<T>& a, const char* name) {
  const Dims d = dims(a, name);
  return {a.data(), d.batch, d.heads, d.rows, d.cols};
}

// The leading dimensions of `like` with the last two replaced by (rows, cols).
std::vector<py::ssize_t> shape_like(const py::array& like, py::ssize_t rows, py::ssize_t cols) {
  std::vector<py::ssize_t> s(like.shape(), like.shape() + like.ndim());
  s[s.size() - 2] = rows;
  s[s.size() - 1] = cols;
  return s;
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}
py::array_t<std::int64_t> to_array(const std::vector<index_t>& v) {
  return py::array_t<std::int64_t>(static_cast<py::ssize_t>(v.size()), reinterpret_cast<const std::int64_t*>(v.data()));
}
py::array_t<float> to_array(const DenseMatrix<float>& m) {
  py::array_t<float> a({static_cast<py::ssize_t>(m.rows), static_cast<py::ssize_t>(m.cols)});
  std::copy(m.data.begin(), m.data.end(), a.mutable_data());
  return a;
}

std::uint64_t seed_of(std::int64_t seed) {
  if (seed < 0) value_error("seed: expected an integer in [0, 2^63), got " + std::to_string(seed));
  return static_cast<std::uint64_t>(seed);
}

LeverageOptions leverage_options(const std::string& method, double ridge, double rank_rtol, const std::string& sketch,
                                 index_t sketch_size, double gamma, index_t jl_columns, double delta, std::int64_t seed) {
  LeverageOptions o;
  o.method = parse_score_method(method);
  o.ridge = ridge, o.rank_rtol = rank_rtol, o.sketch = parse_sketch_kind(sketch), o.sketch_size = sketch_size;
  o.gamma = gamma, o.jl_columns = jl_columns, o.delta = delta, o.seed = seed_of(seed);
  return o;
}

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

// The selection arrays of the op: key_segments (.., n) and query_keys (.., m, top_k) int64.
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
  return py::make_tuple(segs, own);
}

// The selection behind the op's arrays, checked against the layout of these shapes, with its key mask.
Selection selection_of_arrays(py::handle segs_, py::handle own_, py::handle mask, const AttentionShape& sh,
                              const AttentionOptions& o) {
  const Selection layout = selection_layout(sh, o);
  const auto key_mask = key_mask_of(mask, sh);
  const auto segs = array_of<std::int64_t>(segs_, "key_segments"), own = array_of<std::int64_t>(own_, "query_keys");
  if (segs.size() != static_cast<py::ssize_t>(layout.pairs() * layout.n))
    value_error("key_segments: expected (.., n) = " + std::to_string(layout.pairs() * layout.n) + " entries, got " +
                std::to_string(segs.size()));
  if (own.size() != static_cast<py::ssize_t>(layout.pairs() * layout.m * layout.top_k))
    value_error("query_keys: expected (.., m, " + std::to_string(layout.top_k) + ") = " +
                std::to_string(layout.pairs() * layout.m * layout.top_k) + " entries, got " + std::to_string(own.size()));
  static_assert(sizeof(index_t) == sizeof(std::int64_t));
  Selection sel = selection_from_arrays(layout, reinterpret_cast<const index_t*>(segs.data()),
                                        reinterpret_cast<const index_t*>(own.data()));
  if (key_mask) sel.key_mask.assign(key_mask->data(), key_mask->data() + key_mask->size());
  return sel;
}

// The op's forward in float T: the selection (made from float32 q and k, as attention() makes
// it), attention over it, and the selection as arrays: (out, stat, key_segments, query_keys).
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
  return py::make_tuple(out_stat[0], out_stat[1], arrays[0], arrays[1]);
}

py::object array_to_numpy(const Array& a) {
  std::vector<py::ssize_t> shape(a.shape.begin(), a.shape.end());
  switch (a.dtype) {
    case DType::float32: {
      py::array_t<float> r(shape);
      std::copy(a.f32.begin(), a.f32.end(), r.mutable_data());
      return r;
    }
    case DType::float64: {
      py::array_t<double> r(shape);
      std::copy(a.f64.begin(), a.f64.end(), r.mutable_data());
      return r;
    }
    case DType::int64: {
      py::array_t<std::int64_t> r(shape);
      std::copy(a.i64.begin(), a.i64.end(), r.mutable_data());
      return r;
    }
  }
  return py::none();
}

Array numpy_to_array(py::handle obj, const char* name) {
  py::array a = py::array::ensure(obj);
  if (!a) value_error(std::string(name) + ": expected an array-like of numbers");
  std::vector<index_t> shape(a.shape(), a.shape() + a.ndim());
  const char kind = a.dtype().kind();
  if (kind == 'f' && a.dtype().itemsize() == 8) {
    const auto c = array_of<double>(a, name);
    return Array::from_float64(shape, std::vector<double>(c.data(), c.data() + c.size()));
  }
  if (kind == 'i' || kind == 'u' || kind == 'b') {
    const auto c = array_of<std::int64_t>(a, name);
    return Array::from_int64(shape, std::vector<std::int64_t>(c.data(), c.data() + c.size()));
  }
  const auto c = array_of<float>(a, name);
  return Array::from_float32(shape, std::vector<float>(c.data(), c.data() + c.size()));
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

void bind_results(py::module_& m) {
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

  py::class_<Reduced>(m, "Reduced", "Rows of X in a lower dimension m.")
      .def_property_readonly("Y", [](const Reduced& r) { return to_array(r.Y); }, "(n, m) float32")
      .def_property_readonly("method", [](const Reduced& r) { return to_string(r.method); })
      .def_property_readonly("columns", [](const Reduced& r) { return to_array(r.columns); })
      .def_property_readonly("weights", [](const Reduced& r) { return to_array(r.weights); });

  py::class_<PlantedInstance>(m, "PlantedInstance", "A planted instance: queries aligned with a few relevant keys.")
      .def_property_readonly("Q", [](const PlantedInstance& p) { return to_array(p.Q); })
      .def_property_readonly("K", [](const PlantedInstance& p) { return to_array(p.K); })
      .def_property_readonly("V", [](const PlantedInstance& p) { return to_array(p.V); })
      .def_property_readonly("relevant", [](const PlantedInstance& p) { return to_array(p.relevant); })
      .def_property_readonly("query_target", [](const PlantedInstance& p) { return to_array(p.query_target); });

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
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "levattn: heavy entries of attention and attention over them in linear time (C++ core).";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      switch (e.kind()) {
        case ErrorKind::invalid_argument: PyErr_SetString(PyExc_ValueError, e.what()); return;
        case ErrorKind::io: PyErr_SetString(PyExc_OSError, e.what()); return;
        case ErrorKind::internal: PyErr_SetString(PyExc_RuntimeError, e.what()); return;
      }
    }
  });
  bind_results(m);

  m.def("version", [] { return std::string(version()); }, "The library's version string.");
  m.def("build_info", [] {
    const BuildInfo b = build_info();
    py::dict d;
    d["version"] = b.version, d["blas"] = b.blas, d["blas_core"] = b.blas_core, d["isa"] = b.isa;
    d["cpu_isa"] = b.cpu_isa, d["threads"] = b.threads, d["mpi"] = b.mpi, d["sanitizers"] = b.sanitizers;
    return d;
  }, "The build: version, BLAS, its kernel core, the kernel ISA in use and the CPU's best, threads.");
  m.def("info_text", [] { return to_string(build_info()); }, "What `levattn info` prints.");

  m.def("leverage_scores", [](py::handle K_, const std::string& method, double ridge, double rank_rtol,
                              const std::string& sketch, index_t sketch_size, double gamma, index_t jl_columns,
                              double delta, std::int64_t seed) {
    const auto K = array_of<float>(K_, "K");
    const LeverageOptions o = leverage_options(method, ridge, rank_rtol, sketch, sketch_size, gamma, jl_columns, delta, seed);
    const ConstMatrix k = matrix(K, "K");
    py::gil_scoped_release release;
    return leverage_scores(k, o);
  }, arg("K"), py::kw_only(), arg("method") = "exact", arg("ridge") = 0.0, arg("rank_rtol") = 1e-5,
     arg("sketch") = "countsketch", arg("sketch_size") = 0, arg("gamma") = 0.2, arg("jl_columns") = 0,
     arg("delta") = 0.01, arg("seed") = 0, R"doc(Leverage scores tau_j = k_j^T (K^T K)^+ k_j of the keys.

K: (n, d) float32 (converted if needed). Returns LeverageScores (scores (n,), rank, bounds).
exact: float64 Gram matrix and a rank-revealing eigendecomposition, O(n d^2), scores exact to
rel_error_bound. sketch: the Gram matrix of S K (CountSketch, SRHT or Gaussian, sketch_size rows,
>= d), each score within (1 +- gamma) with probability >= 1 - delta; reproducible by seed.)doc");

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
                            const std::optional<LeverageOptions>& lev, bool causal) -> py::object {
    const auto Q = array_of<float>(Q_, "Q"), K = array_of<float>(K_, "K");
    HeavyOptions o;
    o.p = p, o.samples = samples, o.gamma = gamma, o.delta = delta, o.seed = seed_of(seed);
    o.normaliser = parse_normaliser(normaliser);
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
     arg("causal") = false,
     R"doc(Every eps-heavy entry A_ij = |q_i.k_j|^p / sum_l |q_i.k_l|^p >= eps, searched over U_eps only.

Q: (m, d), K: (n, d) (or 3-D / 4-D stacks: a list per pair). p = 2 with exact normalisers:
exact, O(n d^2 + m d^2 + m |U| d), no entry is missed (the universal set guarantee).
normaliser="sampled": r keys drawn by sensitivity, normalisers within (1 +- gamma) w.p. 1 - delta.
causal=True (p = 2, exact; m == n): the entries of causal attention, A_ij over keys j <= i,
searched over each block's causal universal set, O(n d^2 + n |C| d).)doc");

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

  m.def("reduce_dimension", [](py::handle X_, index_t m_, const std::string& method, std::int64_t seed, double delta) {
    const auto X = array_of<float>(X_, "X");
    ReduceOptions o;
    o.method = parse_reduce_method(method), o.m = m_, o.seed = seed_of(seed), o.delta = delta;
    const ConstMatrix x = matrix(X, "X");
    py::gil_scoped_release release;
    return reduce_dimension(x, o);
  }, arg("X"), arg("m") = 0, py::kw_only(), arg("method") = "gaussian", arg("seed") = 0, arg("delta") = 0.01,
     R"doc(Rows of X (n, d) in dimension m with the pairwise inner products kept (feature-dimension reduction).

gaussian / srht / countsketch: Y = X S^T; svd: the best rank-m factor; bss: a reweighted
column subset. m = 0: the default size for failure probability delta. Returns Reduced (Y (n, m)).)doc");

  m.def("softmax_gram_error", [](py::handle X_, py::handle Y_) {
    const auto X = array_of<float>(X_, "X"), Y = array_of<float>(Y_, "Y");
    const ConstMatrix x = matrix(X, "X"), y = matrix(Y, "Y");
    py::gil_scoped_release release;
    return softmax_gram_error(x, y);
  }, arg("X"), arg("Y"), "max_ij |exp(x_i.x_j) - exp(y_i.y_j)| / max_ij exp(x_i.x_j): how well Y keeps X's softmax Gram.");

  m.def("sketch_rows", [](py::handle A_, index_t s, const std::string& kind, std::int64_t seed) {
    const auto A = array_of<float>(A_, "A");
    const ConstMatrix a = matrix(A, "A");
    const SketchKind sk = parse_sketch_kind(kind);
    const std::uint64_t sd = seed_of(seed);
    DenseMatrix<double> r(0, 0);
    {
      py::gil_scoped_release release;
      r = sketch_rows(a, s, sk, sd);
    }
    py::array_t<double> out({static_cast<py::ssize_t>(r.rows), static_cast<py::ssize_t>(r.cols)});
    std::copy(r.data.begin(), r.data.end(), out.mutable_data());
    return out;
  }, arg("A"), arg("s"), arg("kind") = "countsketch", arg("seed") = 0, "S A (s, d) in float64 for a random embedding S (s, n).");

  m.def("planted", [](index_t n, index_t d, index_t relevant, index_t m_, std::int64_t seed, double noise,
                      double signal, double query_norm) {
    PlantedOptions o;
    o.n = n, o.d = d, o.relevant = relevant, o.m = m_, o.seed = seed_of(seed), o.noise = noise;
    o.signal = signal, o.query_norm = query_norm;
    py::gil_scoped_release release;
    return planted(o);
  }, arg("n"), arg("d"), py::kw_only(), arg("relevant") = 8, arg("m") = 0, arg("seed") = 0, arg("noise") = 1.0,
     arg("signal") = 0.0, arg("query_norm") = 0.0,
     "A planted instance (Q, K, V): `relevant` keys that each query is aligned with, among noise keys; by seed.");

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

Its top_k, window, segment, all_keys and causal are those select_keys gives; no keys. O(1).)doc");

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
     R"doc(levattn.torch's forward: (out (.., m, dv), stat (.., m), key_segments (.., n), query_keys (.., m, top_k)).

The selection of spec (made from q and k rounded to float32; key_mask: None or (batch, n), 0 for a
padding key, never selected nor attended), attention over it in q's float type
(float64 or float32) and the selection as fixed-size int64 arrays (key_segments: the last query
segment whose shared set holds each key, -1 for none; query_keys: each query's own keys, -1 for
an unused slot). Cost: the selection's plus O(m |S| (d + dv)).)doc");

  m.def("op_backward", [](py::handle q, py::handle k, py::handle v, py::handle out, py::handle stat, py::handle dout,
                          py::handle segs, py::handle own, py::handle key_mask, const std::string& spec,
                          std::optional<double> scale, bool causal, bool need_dq, bool need_dk, bool need_dv) {
    const AttentionOptions o = options_of(spec, scale, causal);
    const auto qa = array_of<float>(q, "q"), ka = array_of<float>(k, "k"), va = array_of<float>(v, "v");
    const Selection sel = selection_of_arrays(segs, own, key_mask, attention_shape(qa, ka, va), o);
    const py::array a = py::array::ensure(q);
    if (a && a.dtype().kind() == 'f' && a.dtype().itemsize() == 8)
      return backward<double>(q, k, v, out, stat, dout, sel, o, need_dq, need_dk, need_dv);
    return backward<float>(q, k, v, out, stat, dout, sel, o, need_dq, need_dk, need_dv);
  }, arg("q"), arg("k"), arg("v"), arg("out"), arg("stat"), arg("grad_out"), arg("key_segments"), arg("query_keys"),
     arg("key_mask"), arg("spec"), arg("scale"), arg("causal"), arg("need_dq") = true, arg("need_dk") = true,
     arg("need_dv") = true,
     "levattn.torch's backward: (dq, dk, dv) over the selection of op_forward's arrays, None where not needed.");

  m.def("selection_from_arrays", [](py::handle segs, py::handle own, py::handle key_mask, const std::string& spec,
                                    std::optional<double> scale, bool causal, const std::array<index_t, 7>& shape) {
    return selection_of_arrays(segs, own, key_mask, shape_of(shape), options_of(spec, scale, causal));
  }, arg("key_segments"), arg("query_keys"), arg("key_mask"), arg("spec"), arg("scale"), arg("causal"), arg("shape"),
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

  py::class_<StreamingUniversalSet>(m, "StreamingUniversalSet", R"doc(The x^2 universal set in one pass over the keys.

StreamingUniversalSet(d, eps, dv=0, ridge=0.0, rank_rtol=1e-5): push keys (rows, d) and, with
dv > 0, values (rows, dv) in blocks of any size. The state holds M = K^T K (float64) and the keys
that can still be eps-heavy (scores only fall as keys arrive), O(d^2 + (d / eps + block) (d + dv))
memory whatever the number of keys. universal_set() is the offline levattn.universal_set(K, eps)
of the keys so far, indices and scores bit for bit. save(path) / StreamingUniversalSet.load(path):
a versioned state file with a CRC-32; a damaged one is an OSError naming the file. Its methods
hold the GIL: one object is never used by two Python threads at once.)doc")
      .def(py::init([](index_t d, double eps, index_t dv, double ridge, double rank_rtol) {
             LeverageOptions o;
             o.ridge = ridge, o.rank_rtol = rank_rtol;
             return StreamingUniversalSet(d, dv, eps, o);
           }),
           arg("d"), arg("eps"), arg("dv") = 0, py::kw_only(), arg("ridge") = 0.0, arg("rank_rtol") = 1e-5)
      .def("push", [](StreamingUniversalSet& s, py::handle k_, py::handle v_) {
             const auto K = array_of<float>(k_, "keys");
             const ConstMatrix k = matrix(K, "keys");
             CArray<float> V;
             ConstMatrix v;
             if (!v_.is_none()) {
               V = array_of<float>(v_, "values");
               v = matrix(V, "values");
             }
             s.push(k, v);
           }, arg("keys"), arg("values") = py::none(), "Appends keys (rows, d) and, when dv > 0, their values (rows, dv).")
      .def("universal_set", [](const StreamingUniversalSet& s) {
             return s.universal_set();
           }, "The universal set of every key pushed so far (the offline set exactly). O(d^3 + |C| d^2).")
      .def("heavy_entries", [](const StreamingUniversalSet& s, py::handle q_) {
             const auto Q = array_of<float>(q_, "queries");
             const ConstMatrix q = matrix(Q, "queries");
             return s.heavy_entries(q);
           }, arg("q"), "Exact eps-heavy entries of x^2 attention of q (m, d) against every key so far.")
      .def("attention", [](const StreamingUniversalSet& s, py::handle q_, const std::string& kernel, double p,
                           std::optional<double> scale) {
             const auto Q = array_of<float>(q_, "queries");
             const ConstMatrix q = matrix(Q, "queries");
             AttentionOptions o;
             o.kernel = parse_kernel(kernel), o.p = p, o.scale = scale.value_or(kNaN);
             std::vector<float> out;
             {
                 out = s.attention(q, o);
             }
             py::array_t<float> a({static_cast<py::ssize_t>(q.rows), static_cast<py::ssize_t>(s.dv())});
             std::copy(out.begin(), out.end(), a.mutable_data());
             return a;
           }, arg("q"), py::kw_only(), arg("kernel") = "softmax", arg("p") = 2.0, arg("scale") = py::none(),
           "Attention of q (m, d) over the kept keys and their values: (m, dv).")
      .def("save", [](const StreamingUniversalSet& s, const std::filesystem::path& path) { s.save(path); }, arg("path"),
           "Writes the state atomically (versioned, CRC-32 checked).")
      .def_static("load", &StreamingUniversalSet::load, arg("path"), "A state written by save(); OSError if damaged.")
      .def_property_readonly("n", &StreamingUniversalSet::n, "keys pushed so far")
      .def_property_readonly("d", &StreamingUniversalSet::d)
      .def_property_readonly("dv", &StreamingUniversalSet::dv)
      .def_property_readonly("eps", &StreamingUniversalSet::eps)
      .def_property_readonly("candidates", &StreamingUniversalSet::candidates, "keys the state still holds")
      .def_property_readonly("workspace_bytes", &StreamingUniversalSet::workspace_bytes)
      .def_property_readonly("peak_workspace_bytes", &StreamingUniversalSet::peak_workspace_bytes);

  py::class_<KVCache>(m, "KVCache", R"doc(A KV cache for decoding whose memory does not grow with the context.

KVCache(batch, kv_heads, d, dv, eps=0.01, window=64, sinks=4, prune_every=256, keep_full=False):
append(k, v) with k (batch, kv_heads, t, d), v (batch, kv_heads, t, dv) (3-D without batch, or
2-D for one head); attend(q) with q (batch, q_heads, tq, d), q_heads a multiple of kv_heads
(grouped-query attention), returns (batch, q_heads, tq, dv) attention over each kv head's kept
keys. A key is evicted only when its leverage score against every key so far is below eps: no
later query can find it eps-heavy under x^2 attention. The last `window` and first `sinks`
tokens are always kept. report_mass=True also returns dict(kept, x2_mass, kernel_mass): the
x^2 mass on the kept keys (exact) and, with keep_full=True (every key kept for evaluation), the
kernel's mass against the full cache. Its methods hold the GIL.)doc")
      .def(py::init([](index_t batch, index_t kv_heads, index_t d, index_t dv, double eps, index_t window, index_t sinks,
                       index_t prune_every, bool keep_full, const std::optional<LeverageOptions>& lev) {
             KVCacheOptions o;
             o.eps = eps, o.window = window, o.sinks = sinks, o.prune_every = prune_every, o.keep_full = keep_full;
             if (lev) o.leverage = *lev;
             return KVCache(batch, kv_heads, d, dv, o);
           }),
           arg("batch"), arg("kv_heads"), arg("d"), arg("dv"), py::kw_only(), arg("eps") = 0.01, arg("window") = 64,
           arg("sinks") = 4, arg("prune_every") = kCausalBlock, arg("keep_full") = false, arg("leverage") = py::none())
      .def("append", [](KVCache& c, py::handle k_, py::handle v_) {
             const auto K = array_of<float>(k_, "keys"), V = array_of<float>(v_, "values");
             c.append(tensor4(K, "keys"), tensor4(V, "values"));
           }, arg("k"), arg("v"), "Appends t tokens: k (batch, kv_heads, t, d), v (batch, kv_heads, t, dv).")
      .def("attend", [](const KVCache& c, py::handle q_, const std::string& kernel, double p, std::optional<double> scale,
                        bool report_mass) -> py::object {
             const auto Q = array_of<float>(q_, "queries");
             const Tensor4Ref q = tensor4(Q, "queries");
             AttentionOptions o;
             o.kernel = parse_kernel(kernel), o.p = p, o.scale = scale.value_or(kNaN);
             py::array_t<float> out(shape_like(Q, q.rows, c.dv()));
             KVCacheReport r = c.attend(q, out.mutable_data(), o, report_mass);
             if (!report_mass) return out;
             py::dict d;
             d["kept"] = to_array(r.kept);
             d["x2_mass"] = to_array(r.x2_mass);
             if (!r.kernel_mass.empty()) d["kernel_mass"] = to_array(r.kernel_mass);
             return py::make_tuple(out, d);
           }, arg("q"), py::kw_only(), arg("kernel") = "softmax", arg("p") = 2.0, arg("scale") = py::none(),
           arg("report_mass") = false, "Attention of q (batch, q_heads, tq, d) over the kept keys of each kv head.")
      .def("kept", [](const KVCache& c, index_t b, index_t h) { return to_array(c.kept(b, h)); }, arg("b") = 0,
           arg("h") = 0, "The token indices kv head (b, h) keeps, ascending.")
      .def_property_readonly("tokens", &KVCache::tokens)
      .def_property_readonly("bytes", &KVCache::bytes);

  m.def("read_npy", [](const std::filesystem::path& path) { return array_to_numpy(read_npy(path)); }, arg("path"),
        "A .npy file (float32, float64 or int64) as a numpy array; OSError naming the file on a bad one.");
  m.def("write_npy", [](const std::filesystem::path& path, py::handle a) { write_npy(path, numpy_to_array(a, "array")); },
        arg("path"), arg("array"), "Writes a .npy file atomically (float32, float64 or int64).");
  m.def("read_npz", [](const std::filesystem::path& path) {
    py::dict d;
    for (auto& [name, a] : read_npz(path)) d[py::str(name)] = array_to_numpy(a);
    return d;
  }, arg("path"), "A .npz archive as a dict of numpy arrays.");
  m.def("write_npz", [](const std::filesystem::path& path, const py::dict& arrays) {
    std::vector<std::pair<std::string, Array>> v;
    for (auto [name, a] : arrays) v.emplace_back(py::str(name).cast<std::string>(), numpy_to_array(a, "array"));
    write_npz(path, v);
  }, arg("path"), arg("arrays"), "Writes a dict of arrays as a .npz archive, atomically.");
}
