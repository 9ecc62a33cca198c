// The binding of the streaming universal set and the KV cache (their methods hold the GIL).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <filesystem>
#include <optional>
#include <string>

#include "arrays.hpp"
#include "bindings.hpp"

namespace levattn::python {

void bind_streaming(py::module_& m) {
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
}

}  // namespace levattn::python
