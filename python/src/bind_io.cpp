// The binding of the .npy and .npz readers and writers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl/filesystem.h>

#include <filesystem>
#include <string>

#include "arrays.hpp"
#include "bindings.hpp"

namespace levattn::python {
namespace {

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

}  // namespace

void bind_io(py::module_& m) {
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

}  // namespace levattn::python
