// NpyRowReader: a .npy file (one matrix or a stack of them) read a block of rows at a time.
#include <cfloat>
#include <cmath>
#include <span>

#include "detail/require.hpp"
#include "npy_format.hpp"
#include "levattn/io.hpp"

namespace levattn {

NpyRowReader::NpyRowReader(const std::filesystem::path& path, int max_dims)
    : file_(std::make_unique<detail::InputFile>(path, path.string())), where_(path.string()) {
  const detail::NpyHeader h = detail::read_npy_file_header(*file_, where_);
  const auto dims = static_cast<int>(h.shape.size());
  LEVATTN_REQUIRE_FILE(dims >= 2 && dims <= max_dims, where_, "shape: expected ",
                       max_dims == 2 ? std::string("2 dimensions (rows, columns)")
                                     : "2 to " + std::to_string(max_dims) + " dimensions (..., rows, columns)",
                       ", got ", detail::shape_string(h.shape));
  LEVATTN_REQUIRE_FILE(h.dtype != DType::int64, where_, "dtype: expected float32 or float64, got int64");
  shape_ = h.shape;
  rows_ = h.shape[dims - 2], cols_ = h.shape[dims - 1];
  for (int a = 0; a < dims - 2; ++a) pairs_ *= h.shape[a];
  index_t long_dims = 0;  // Fortran order is C order when at most one dimension exceeds 1
  for (index_t e : h.shape) long_dims += e > 1 ? 1 : 0;
  LEVATTN_REQUIRE_FILE(!(h.fortran_order && long_dims > 1), where_,
                       "fortran_order: rows are read one block at a time, which needs C order");
  dtype_ = h.dtype, data_offset_ = h.data_offset;
}

NpyRowReader::~NpyRowReader() = default;

void NpyRowReader::read(index_t r0, index_t count, float* out) const {
  LEVATTN_REQUIRE(!(r0 < 0 || count < 0 || r0 > rows_ - count), where_, "rows ", r0, " + ", count, " beyond its ",
                  rows_);
  const std::size_t values = static_cast<std::size_t>(count * cols_);
  if (values == 0) return;  // nothing to read, however many matrices the stack declares
  const std::uint64_t width = detail::dtype_size(dtype_), row_bytes = static_cast<std::uint64_t>(cols_) * width;
  for (index_t s = 0; s < pairs_; ++s) {
    const std::uint64_t at = data_offset_ + (static_cast<std::uint64_t>(s) * static_cast<std::uint64_t>(rows_) +
                                             static_cast<std::uint64_t>(r0)) * row_bytes;
    read_slice(at, r0, values, out + static_cast<std::size_t>(s) * values);
  }
}

void NpyRowReader::read_slice(std::uint64_t at, index_t r0, std::size_t values, float* out) const {
  const std::size_t width = detail::dtype_size(dtype_);
  if (dtype_ == DType::float32) {
    file_->read_at(at, std::span(reinterpret_cast<std::uint8_t*>(out), values * width));
    return;
  }
  std::vector<double> buf(values);
  file_->read_at(at, std::span(reinterpret_cast<std::uint8_t*>(buf.data()), values * width));
  for (std::size_t a = 0; a < values; ++a) {
    LEVATTN_REQUIRE(!(std::isfinite(buf[a]) && std::fabs(buf[a]) > static_cast<double>(FLT_MAX)), where_,
                    "a float64 value beyond float32's range at row ", r0 + static_cast<index_t>(a) / cols_);
    out[a] = static_cast<float>(buf[a]);
  }
}

}  // namespace levattn
