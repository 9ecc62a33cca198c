// Arrays in and out of the binding: numpy array-likes as the library's matrices and tensors
// (ValueError naming the argument for anything else), results as numpy arrays.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "levattn/levattn.hpp"

namespace levattn::python {

namespace py = pybind11;
using py::arg;
inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <class T>
using CArray = py::array_t<T, py::array::c_style | py::array::forcecast>;

[[noreturn]] inline void value_error(const std::string& msg) { throw py::value_error(msg); }

// obj as a C-contiguous array of T: taken as it is when it already is one, else converted
// (any numeric array-like); anything else is a ValueError naming the argument.
template <class T>
inline CArray<T> array_of(py::handle obj, const char* name) {
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

inline std::string shape_text(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A 2-D (rows, cols) array as a matrix.
inline ConstMatrix matrix(const CArray<float>& a, const char* name) {
  if (a.ndim() != 2) value_error(std::string(name) + ": expected a 2-D (rows, columns) array, got shape " + shape_text(a));
  return {a.data(), static_cast<index_t>(a.shape(0)), static_cast<index_t>(a.shape(1))};
}

// (n, d), (heads, n, d) or (batch, heads, n, d), as the library's batched entry points take.
struct Dims {
  index_t batch = 1, heads = 1, rows = 0, cols = 0;
};
inline Dims dims(const py::array& a, const char* name) {
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
inline Tensor4Ref tensor4(const CArray<T>& a, const char* name) {
  const Dims d = dims(a, name);
  return {a.data(), d.batch, d.heads, d.rows, d.cols};
}

// The leading dimensions of `like` with the last two replaced by (rows, cols).
inline std::vector<py::ssize_t> shape_like(const py::array& like, py::ssize_t rows, py::ssize_t cols) {
  std::vector<py::ssize_t> s(like.shape(), like.shape() + like.ndim());
  s[s.size() - 2] = rows;
  s[s.size() - 1] = cols;
  return s;
}

template <class T>
inline py::array_t<T> to_array(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}
inline py::array_t<std::int64_t> to_array(const std::vector<index_t>& v) {
  return py::array_t<std::int64_t>(static_cast<py::ssize_t>(v.size()), reinterpret_cast<const std::int64_t*>(v.data()));
}
inline py::array_t<float> to_array(const DenseMatrix<float>& m) {
  py::array_t<float> a({static_cast<py::ssize_t>(m.rows), static_cast<py::ssize_t>(m.cols)});
  std::copy(m.data.begin(), m.data.end(), a.mutable_data());
  return a;
}

inline std::uint64_t seed_of(std::int64_t seed) {
  if (seed < 0) value_error("seed: expected an integer in [0, 2^63), got " + std::to_string(seed));
  return static_cast<std::uint64_t>(seed);
}

}  // namespace levattn::python
