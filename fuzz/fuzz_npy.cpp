// Fuzz harness of the .npy reader: the input is a whole .npy file. read_npy, the in-memory decoder
// of .npz members (detail::parse_npy) and NpyRowReader (2 to 4 dimensions, in blocks of rows)
// must each return or reject it with an Error naming the file; where they accept it they must
// agree value for value, and the image write_npy would write of what read_npy returns must decode
// to the same array.
#include <cmath>
#include <array>
#include <cstring>
#include <memory>
#include <vector>

#include "fuzz/harness.hpp"
#include "levattn/io.hpp"
#include "npy_format.hpp"

namespace {

using levattn::Array;
using levattn::fuzz::same_bits;
using levattn::DType;
using levattn::index_t;
namespace fz = levattn::fuzz;

// The array as NpyRowReader returns it: float32, every value converted as a float (NaN stays NaN).
std::vector<float> as_float32(const Array& a) {
  if (a.dtype == DType::float32) return a.f32;
  std::vector<float> out(a.f64.size());
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<float>(a.f64[i]);
  return out;
}

bool within_float32(const Array& a) {
  for (double v : a.f64)
    if (std::isfinite(v) && std::fabs(v) > 3.4028234663852886e38) return false;
  return true;
}

// Reads the file by NpyRowReader in blocks of `block` rows; compares with `whole` when given.
void check_row_reader(const std::filesystem::path& path, int max_dims, index_t block, const Array* whole) {
  std::unique_ptr<levattn::NpyRowReader> reader;
  if (!fz::accepted([&] { reader = std::make_unique<levattn::NpyRowReader>(path, max_dims); }, path.string())) return;
  const index_t rows = reader->rows(), cols = reader->cols(), pairs = reader->pairs();
  LEVATTN_FUZZ_CHECK(whole != nullptr, "NpyRowReader opened a file read_npy rejects");
  LEVATTN_FUZZ_CHECK(reader->shape() == whole->shape, "NpyRowReader's shape differs from read_npy's");
  const std::vector<float> expected = as_float32(*whole);
  const bool representable = within_float32(*whole);
  std::vector<float> got;
  // Every block, but where a file of no values declares more rows than that, the first 64 blocks
  // and the last.
  for (index_t r0 = 0, b = 0; r0 < rows; r0 = ++b < 64 ? r0 + block : std::max(r0 + block, rows - block)) {
    const index_t count = std::min(block, rows - r0);
    got.assign(static_cast<std::size_t>(pairs * count * cols), 0.0f);
    if (!fz::accepted([&] { reader->read(r0, count, got.data()); }, path.string())) {
      LEVATTN_FUZZ_CHECK(!representable, "NpyRowReader::read rejected values read_npy accepted");
      return;
    }
    for (index_t s = 0; s < pairs && count * cols > 0; ++s)
      for (index_t i = 0; i < count * cols; ++i) {
        const float want = expected[static_cast<std::size_t>((s * rows + r0) * cols + i)];
        const float have = got[static_cast<std::size_t>((s * count) * cols + i)];
        LEVATTN_FUZZ_CHECK(std::memcmp(&want, &have, sizeof want) == 0, "NpyRowReader read a different value");
      }
  }
  LEVATTN_FUZZ_CHECK(representable || rows == 0, "NpyRowReader read a float64 value beyond float32's range");
  // A read past the last row is rejected, not performed (pairs * cols values fit where rows >= 1).
  if (rows == 0) return;
  got.resize(static_cast<std::size_t>(pairs * cols));
  LEVATTN_FUZZ_CHECK(!fz::accepted([&] { reader->read(rows, 1, got.data()); }, path.string()),
                     "NpyRowReader::read accepted a row past the end");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::uint8_t> bytes(data, size);
  const std::filesystem::path path = fz::write_scratch("input.npy", bytes);
  Array file_array, memory_array;
  const bool by_file = fz::accepted([&] { file_array = levattn::read_npy(path); }, path.string());
  const bool in_memory = fz::accepted([&] { memory_array = levattn::detail::parse_npy(bytes, "member"); }, "member");
  LEVATTN_FUZZ_CHECK(by_file == in_memory, "read_npy and parse_npy disagree on whether the file is valid");
  if (by_file) {
    LEVATTN_FUZZ_CHECK(same_bits(file_array, memory_array), "read_npy and parse_npy read different arrays");
    LEVATTN_FUZZ_CHECK(!file_array.shape.empty() && file_array.shape.size() <= 4, "read_npy returned a shape of 0 or >4 dimensions");
    std::uint64_t count = 1;
    for (index_t e : file_array.shape) count *= static_cast<std::uint64_t>(e);
    const std::size_t held = file_array.f32.size() + file_array.f64.size() + file_array.i64.size();
    LEVATTN_FUZZ_CHECK(count == held, "read_npy's array holds a number of values other than its shape's");
    // The image write_npy writes (its header, then the values) decodes to the same array.
    std::vector<std::uint8_t> image = levattn::detail::npy_header_bytes(file_array);
    const auto values = levattn::detail::value_bytes(file_array);
    image.insert(image.end(), values.begin(), values.end());
    LEVATTN_FUZZ_CHECK(same_bits(levattn::detail::parse_npy(image, "copy"), file_array),
                       "the image write_npy writes decodes to another array");
  }
  // NpyRowReader with 2, 3 or 4 dimensions allowed and blocks of 1, 2 or 7 rows, chosen by the
  // input so that every choice meets every file.
  const std::uint8_t choice = size == 0 ? 0 : data[size - 1];
  const int max_dims = 2 + choice % 3;
  const index_t block = std::array<index_t, 3>{1, 2, 7}[(choice / 3) % 3];
  const bool eligible = by_file && file_array.dtype != DType::int64 && static_cast<int>(file_array.shape.size()) >= 2 &&
                        static_cast<int>(file_array.shape.size()) <= max_dims;
  check_row_reader(path, max_dims, block, eligible ? &file_array : nullptr);
  return 0;
}
