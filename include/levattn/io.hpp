// levattn/io.hpp: NumPy .npy and .npz files, the exchange format of the CLI and of the tests.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "levattn/matrix.hpp"

namespace levattn {

/// Element types the I/O layer reads and writes ('<f4', '<f8', '<i8').
enum class DType { float32, float64, int64 };

/// "float32", "float64" or "int64" (numpy's names).
std::string to_string(DType dtype);
/// The inverse of to_string. Throws Error(invalid_argument) naming the choices for any other name.
DType parse_dtype(const std::string& name);

/// An n-D array in C (row-major) order. Exactly one of f32 / f64 / i64 holds the values,
/// the one matching dtype; the others are empty.
struct Array {
  DType dtype = DType::float32;
  std::vector<index_t> shape;
  std::vector<float> f32;
  std::vector<double> f64;
  std::vector<std::int64_t> i64;

  /// Product of the shape (1 for a 0-D array).
  index_t size() const;

  static Array from_float32(std::vector<index_t> shape, std::vector<float> values);
  static Array from_float64(std::vector<index_t> shape, std::vector<double> values);
  static Array from_int64(std::vector<index_t> shape, std::vector<std::int64_t> values);
};

/// Reads a .npy file (format versions 1.0, 2.0 and 3.0) of dtype little-endian float32, float64 or
/// int64 with 1 to 4 dimensions. Fortran-ordered data is transposed into C order. The header is
/// validated against the file size: a truncated file, a header whose shape does not match the
/// data, an unsupported dtype (big-endian included) or an object array throws
/// Error(ErrorKind::io) naming the file, the field and what was expected.
Array read_npy(const std::filesystem::path& path);

/// Writes a .npy file (version 1.0, C order) atomically: the data goes to a temporary file in the
/// same directory which is then renamed over `path`, so an existing file survives a failure.
void write_npy(const std::filesystem::path& path, const Array& array);

/// Reads every array of a .npz archive (np.savez, stored, or np.savez_compressed, deflated),
/// in archive order; names have the ".npy" suffix removed. Errors as read_npy, naming the member.
std::vector<std::pair<std::string, Array>> read_npz(const std::filesystem::path& path);

/// Writes a .npz archive (stored, uncompressed, readable by numpy.load) atomically.
void write_npz(const std::filesystem::path& path,
               const std::vector<std::pair<std::string, Array>>& arrays);

/// The values of a float32 or float64 array as float32. A float64 value outside the float32 range
/// throws Error(ErrorKind::invalid_argument) naming `what`; NaN and Inf are passed through (the
/// library functions that take the array reject them with the field's name).
std::vector<float> to_float32(const Array& array, const std::string& what);

/// Writes `text` to `path` atomically (temporary file in the same directory, then rename), for
/// CSV and JSON outputs. Throws Error(ErrorKind::io) naming the path.
void write_text_file(const std::filesystem::path& path, std::string_view text);

namespace detail {
class InputFile;
}

/// A float32 or float64 .npy file in C order, read a block of rows at a time and never whole
/// (for streams over more keys than memory holds, and for the shard of rows one process of a
/// distributed run reads). The file is (rows, cols), or with max_dims 3 or 4 a stack (heads, rows,
/// cols) or (batch, heads, rows, cols) of pairs() matrices. The header is validated as read_npy
/// does when the file is opened; Fortran order, other dtypes or other numbers of dimensions throw
/// Error(io) naming the file.
class NpyRowReader {
 public:
  explicit NpyRowReader(const std::filesystem::path& path, int max_dims = 2);
  ~NpyRowReader();
  NpyRowReader(const NpyRowReader&) = delete;
  NpyRowReader& operator=(const NpyRowReader&) = delete;

  const std::vector<index_t>& shape() const { return shape_; }
  index_t pairs() const { return pairs_; }  ///< matrices in the stack: the product of the leading dimensions
  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  /// Rows r0 .. r0 + count - 1 of every matrix of the stack as float32 into out (pairs() x count
  /// x cols), pairs() reads of count * cols contiguous values. A float64 value beyond float32's
  /// range throws Error(invalid_argument) naming the file; a file that shrank since it was opened
  /// throws Error(io).
  void read(index_t r0, index_t count, float* out) const;

 private:
  void read_slice(std::uint64_t at, index_t r0, std::size_t values, float* out) const;
  std::unique_ptr<detail::InputFile> file_;
  std::string where_;
  std::vector<index_t> shape_;
  index_t pairs_ = 1, rows_ = 0, cols_ = 0;
  DType dtype_ = DType::float32;
  std::uint64_t data_offset_ = 0;
};

/// The output files of one command, written as one set. Each add_*() writes its file completely
/// under a temporary name beside the target (throwing Error(io) as the single-file writers, or
/// if the target is a directory or named twice); commit() then moves the existing targets aside
/// and every new file into place, and removes the old ones. If a move fails, the files that were
/// there before are put back and Error(io) is thrown, so that a failure leaves all the old files
/// or all the new ones, never a mix. Without commit() the destructor removes the temporaries and
/// nothing that existed is touched.
class OutputSet {
 public:
  OutputSet() = default;
  OutputSet(const OutputSet&) = delete;
  OutputSet& operator=(const OutputSet&) = delete;
  ~OutputSet();

  void add_npy(const std::filesystem::path& path, const Array& array);
  void add_npz(const std::filesystem::path& path, const std::vector<std::pair<std::string, Array>>& arrays);
  void add_text(const std::filesystem::path& path, std::string_view text);
  void commit();

 private:
  struct Entry {
    std::filesystem::path target, staged, backup;
  };
  void stage(const std::filesystem::path& target,
             const std::function<void(const std::filesystem::path&)>& write);
  std::vector<Entry> entries_;
};

}  // namespace levattn
