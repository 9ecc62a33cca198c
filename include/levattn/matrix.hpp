// levattn/matrix.hpp: non-owning views of caller memory (row-major), the argument type of every
// library function. The library never copies an input it does not need to.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <new>
#include <string>
#include <vector>

namespace levattn {

using index_t = std::int64_t;

/// The product of `dims` (each >= 0). Throws Error(invalid_argument) "<what>: ..." naming the
/// dimensions if one is negative or the product exceeds 2^62.
index_t checked_elements(std::initializer_list<index_t> dims, const std::string& what);

/// Throws Error(invalid_argument) "<what>: needs N bytes (..), more than the M bytes of memory
/// this machine has" unless `bytes` fit in its physical memory: a clear error instead of an
/// allocation that fails or swaps. Returns bytes.
double require_memory(double bytes, const std::string& what);

/// checked_elements(dims) * elem_size bytes, checked by require_memory; returns the elements.
index_t checked_allocation(std::initializer_list<index_t> dims, std::size_t elem_size, const std::string& what);

/// Throws Error(memory) "<what>: cannot allocate N bytes (<shape>): out of memory" with the
/// process's address-space limit when one is set (ulimit -v): what an allocation that failed
/// (std::bad_alloc) of a named array reports.
[[noreturn]] void allocation_failed(double bytes, const std::string& what, const std::string& shape = "");

/// A value-initialised std::vector<T> of the product of `dims` elements, checked first by
/// checked_allocation; a failed allocation throws Error(memory) naming `what` and the bytes.
template <class T>
std::vector<T> allocate_named(std::initializer_list<index_t> dims, const std::string& what) {
  const index_t count = checked_allocation(dims, sizeof(T), what);
  try {
    return std::vector<T>(static_cast<std::size_t>(count));
  } catch (const std::bad_alloc&) {
    allocation_failed(static_cast<double>(count) * static_cast<double>(sizeof(T)), what);
  }
}

/// Row-major view: element (i, j) is data[i * ld + j]; ld >= cols.
template <class T>
struct MatrixRef {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;
  index_t ld = 0;

  MatrixRef() = default;
  MatrixRef(T* d, index_t r, index_t c) : data(d), rows(r), cols(c), ld(c) {}
  MatrixRef(T* d, index_t r, index_t c, index_t stride) : data(d), rows(r), cols(c), ld(stride) {}
  /// A view of const elements from a view of mutable ones.
  template <class U>
  MatrixRef(const MatrixRef<U>& o) : data(o.data), rows(o.rows), cols(o.cols), ld(o.ld) {}

  T* row(index_t i) const { return data + i * ld; }
  T& operator()(index_t i, index_t j) const { return data[i * ld + j]; }
};

using ConstMatrix = MatrixRef<const float>;
using Matrix = MatrixRef<float>;

/// Owning row-major matrix with contiguous rows, for results and workspaces.
template <class T>
struct DenseMatrix {
  index_t rows = 0;
  index_t cols = 0;
  std::vector<T> data;

  DenseMatrix() = default;
  /// r x c zeros; Error(invalid_argument) if r * c overflows or does not fit in memory.
  DenseMatrix(index_t r, index_t c)
      : rows(r), cols(c), data(static_cast<std::size_t>(checked_allocation({r, c}, sizeof(T), "matrix"))) {}
  T* row(index_t i) { return data.data() + i * cols; }
  const T* row(index_t i) const { return data.data() + i * cols; }
  T& operator()(index_t i, index_t j) { return data[static_cast<std::size_t>(i * cols + j)]; }
  T operator()(index_t i, index_t j) const { return data[static_cast<std::size_t>(i * cols + j)]; }
  MatrixRef<T> view() { return {data.data(), rows, cols}; }
  MatrixRef<const T> view() const { return {data.data(), rows, cols}; }
};

/// Contiguous (batch, heads, rows, cols) array of float32, the shape of attention inputs.
/// A 2-D (rows, cols) input is batch = heads = 1; a 3-D (heads, rows, cols) input is batch = 1.
struct Tensor4Ref {
  const float* data = nullptr;
  index_t batch = 1;
  index_t heads = 1;
  index_t rows = 0;
  index_t cols = 0;

  /// The (rows x cols) matrix of one (batch, head) pair.
  ConstMatrix slice(index_t b, index_t h) const {
    return {data + ((b * heads + h) * rows) * cols, rows, cols};
  }
};

}  // namespace levattn
