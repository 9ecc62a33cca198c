// npy_format.hpp: internals shared by io_npy.cpp and io_npz.cpp: the .npy format (parse a
// header, decode an in-memory .npy image, serialise an Array), little-endian byte helpers, file
// reading with errno messages, and the atomic file write. Not installed; not part of the API.
//
// Every function that can fail takes `where`, the field of its Errors (the prefix of their
// messages): the file path for a .npy file ("K.npy"), the file and member for an .npz member
// ("H.npz: member 'value'").
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "levattn/error.hpp"
#include "levattn/io.hpp"

namespace levattn::detail {

// ---------------------------------------------------------------------------------------------
// Little-endian byte helpers (the .npy and ZIP formats are little-endian whatever the host).

inline std::uint16_t load_le16(const std::uint8_t* p) {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
inline std::uint32_t load_le32(const std::uint8_t* p) {
  return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 8) |
         (static_cast<std::uint32_t>(p[2]) << 16) | (static_cast<std::uint32_t>(p[3]) << 24);
}
inline std::uint64_t load_le64(const std::uint8_t* p) {
  return static_cast<std::uint64_t>(load_le32(p)) |
         (static_cast<std::uint64_t>(load_le32(p + 4)) << 32);
}
inline void append_le16(std::vector<std::uint8_t>& out, std::uint16_t v) {
  out.push_back(static_cast<std::uint8_t>(v));
  out.push_back(static_cast<std::uint8_t>(v >> 8));
}
inline void append_le32(std::vector<std::uint8_t>& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
inline void append_le64(std::vector<std::uint8_t>& out, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

// ---------------------------------------------------------------------------------------------
// Arrays and dtypes.

/// Bytes per element: 4 for float32, 8 for float64 and int64.
std::size_t dtype_size(DType dtype);
/// The .npy descr of a dtype: "<f4", "<f8" or "<i8".
std::string dtype_descr(DType dtype);
/// Short name for messages: "float32", "float64" or "int64".
std::string dtype_name(DType dtype);
/// The shape as Python writes a tuple: "(3,)", "(3, 4)", "()".
std::string shape_string(const std::vector<index_t>& shape);

/// Checks that `array` can be written: 1 to 4 dimensions, none negative, the vector matching dtype
/// holds exactly the product of the shape and the other two are empty. Throws
/// Error(invalid_argument) "<where>: ..." otherwise.
void check_writable(const Array& array, const std::string& where);

/// The raw bytes of the values of `array` (the vector matching its dtype), in host order, which
/// is the file's little-endian order (io_npy.cpp refuses to build on a big-endian host).
std::span<const std::uint8_t> value_bytes(const Array& array);

// ---------------------------------------------------------------------------------------------
// The .npy format.

/// The fixed part of a .npy file before the header dictionary.
struct NpyPreamble {
  int major = 1;                  ///< format version: 1, 2 or 3
  std::size_t dict_offset = 0;    ///< where the header dictionary starts: 10 (v1) or 12 (v2, v3)
  std::uint64_t data_offset = 0;  ///< where the data starts: dict_offset + header length
};

/// The number of leading bytes read_npy_preamble needs (or the whole file if it is shorter).
inline constexpr std::size_t kNpyPreambleBytes = 12;

/// Validates the magic string, the version and the header length of a .npy image of `total_size`
/// bytes, given its first min(total_size, kNpyPreambleBytes) bytes. The returned data_offset is at
/// most total_size. Throws Error(io) "<where>: ...".
NpyPreamble read_npy_preamble(std::span<const std::uint8_t> first_bytes, std::uint64_t total_size,
                              const std::string& where);

/// What a .npy header declares, validated against the size of the image.
struct NpyHeader {
  DType dtype = DType::float32;
  std::vector<index_t> shape;
  bool fortran_order = false;
  std::uint64_t data_offset = 0;  ///< bytes before the data
  std::uint64_t data_bytes = 0;   ///< product of the shape times the element size
};

/// Parses the header dictionary of a .npy image: `head` is its first preamble.data_offset bytes.
/// Checks the dtype ('<f4', '<f8', '<i8'), the shape (1 to 4 non-negative dimensions, product
/// without overflow) and that the data is exactly total_size - data_offset bytes long. Nothing is
/// allocated in proportion to the declared shape. Throws Error(io) "<where>: ...".
NpyHeader parse_npy_header(const NpyPreamble& preamble, std::span<const std::uint8_t> head,
                           std::uint64_t total_size, const std::string& where);

/// An Array of the header's dtype and shape with zeroed values (allocates header.data_bytes, which
/// parse_npy_header has checked against the size of the image). A failed allocation throws
/// Error(memory) "<where>: cannot allocate N bytes (<dtype> <shape>) ...".
Array allocate_array(const NpyHeader& header, const std::string& where);
/// The raw bytes of the values of `array`, to be filled with the file's data.
std::span<std::uint8_t> mutable_value_bytes(Array& array);
/// Puts values read in the file's order into C order (transposes Fortran-ordered data).
void finish_array(Array& array, const NpyHeader& header);

/// Decodes a complete in-memory .npy image (the bytes of a file or of an .npz member).
Array parse_npy(std::span<const std::uint8_t> bytes, const std::string& where);

/// The preamble and header dictionary numpy would write for `array` (version 1.0, C order, data
/// aligned to 64 bytes); the .npy image is these bytes followed by value_bytes(array). The array
/// must have passed check_writable.
std::vector<std::uint8_t> npy_header_bytes(const Array& array);

// ---------------------------------------------------------------------------------------------
// Files.

/// A file opened for reading (a regular file; pread-based, so reads do not share a position).
class InputFile {
 public:
  /// Opens `path`; throws Error(io) "<where>: cannot open: <reason>" (for example
  /// "No such file or directory") or "<where>: is not a regular file".
  InputFile(const std::filesystem::path& path, std::string where);
  ~InputFile();
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;

  /// The size of the file when it was opened.
  std::uint64_t size() const { return size_; }
  /// Reads exactly out.size() bytes at `offset`; throws Error(io) if the file is shorter now
  /// (changed since it was opened) or the read fails.
  void read_at(std::uint64_t offset, std::span<std::uint8_t> out) const;

 private:
  int fd_ = -1;
  std::uint64_t size_ = 0;
  std::string where_;
};

/// The header of the .npy file `file`: its preamble, then the header it announces (bounded by the
/// file's size), parsed and checked against the size as parse_npy_header does. Throws Error(io).
NpyHeader read_npy_file_header(const InputFile& file, const std::string& where);

/// The whole contents of a file. Throws Error(io) as InputFile.
std::vector<std::uint8_t> read_file(const std::filesystem::path& path, const std::string& where);

/// Writes the concatenation of `pieces` to `path` atomically: the bytes go to a new file
/// "<path>.tmp.<random>" in the same directory, which is flushed (fsync) and renamed over `path`.
/// On any failure the temporary file is removed, `path` is left as it was, and Error(io)
/// "<path>: ..." is thrown.
void write_file_atomically(const std::filesystem::path& path,
                           std::span<const std::span<const std::uint8_t>> pieces);

}  // namespace levattn::detail
