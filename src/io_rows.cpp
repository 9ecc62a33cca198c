// NpyRowReader: a 2-D .npy file read a block of rows at a time.
#include <cfloat>
#include <cmath>
#include <span>

#include "detail/npy_format.hpp"
#include "levattn/io.hpp"

namespace levattn {

NpyRowReader::NpyRowReader(const std::filesystem::path& path)
    : file_(std::make_unique<detail::InputFile>(path, path.string())), where_(path.string()) {
  const detail::NpyHeader h = detail::read_npy_file_header(*file_, where_);
  if (h.shape.size() != 2)
    throw Error(ErrorKind::io, where_ + ": shape: expected 2 dimensions (rows, columns), got " + detail::shape_string(h.shape));
  if (h.dtype == DType::int64) throw Error(ErrorKind::io, where_ + ": dtype: expected float32 or float64, got int64");
  if (h.fortran_order && h.shape[0] > 1 && h.shape[1] > 1)
    throw Error(ErrorKind::io, where_ + ": fortran_order: rows are read one block at a time, which needs C order");
  rows_ = h.shape[0], cols_ = h.shape[1], dtype_ = h.dtype, data_offset_ = h.data_offset;
}

NpyRowReader::~NpyRowReader() = default;

void NpyRowReader::read(index_t r0, index_t count, float* out) const {
  if (r0 < 0 || count < 0 || r0 > rows_ - count)
    throw Error(ErrorKind::invalid_argument, where_ + ": rows " + std::to_string(r0) + " + " + std::to_string(count) +
                                                 " beyond its " + std::to_string(rows_));
  const std::size_t values = static_cast<std::size_t>(count * cols_), width = detail::dtype_size(dtype_);
  const std::uint64_t at = data_offset_ + static_cast<std::uint64_t>(r0) * static_cast<std::uint64_t>(cols_) * width;
  if (dtype_ == DType::float32) {
    file_->read_at(at, std::span(reinterpret_cast<std::uint8_t*>(out), values * width));
    return;
  }
  std::vector<double> buf(values);
  file_->read_at(at, std::span(reinterpret_cast<std::uint8_t*>(buf.data()), values * width));
  for (std::size_t a = 0; a < values; ++a) {
    if (std::isfinite(buf[a]) && std::fabs(buf[a]) > static_cast<double>(FLT_MAX))
      throw Error(ErrorKind::invalid_argument, where_ + ": a float64 value beyond float32's range at row " +
                                                   std::to_string(r0 + static_cast<index_t>(a) / cols_));
    out[a] = static_cast<float>(buf[a]);
  }
}

}  // namespace levattn
