// The binding of dimension reduction, sketches and planted instances.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "arrays.hpp"
#include "bindings.hpp"

namespace levattn::python {

void bind_sketches(py::module_& m) {
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
}

}  // namespace levattn::python
