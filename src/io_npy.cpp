// io_npy.cpp: the Array type, .npy reading and writing, to_float32, and the internals shared with
// io_npz.cpp (declared in npy_format.hpp).
//
// Files are untrusted input: every length and offset is checked against the size of the file
// before it is used, and nothing is allocated in proportion to a declared shape before the shape
// has been checked against the bytes that are actually there.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <bit>
#include <cerrno>
#include <cfloat>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

#include "detail/names.hpp"
#include "detail/require.hpp"
#include "npy_format.hpp"

// The values are copied between files and vectors without byte swapping.
static_assert(std::endian::native == std::endian::little,
              "levattn's .npy/.npz I/O assumes a little-endian host");
static_assert(sizeof(float) == 4 && sizeof(double) == 8 && std::numeric_limits<float>::is_iec559 &&
                  std::numeric_limits<double>::is_iec559,
              "levattn's .npy/.npz I/O assumes IEEE-754 float and double");

namespace levattn {
namespace {

constexpr std::size_t kMaxDims = 4;

std::string errno_message(int err) {
  return std::error_code(err, std::generic_category()).message();
}

/// a * b, or false when it overflows 64 bits.
bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

/// Product of the shape if every dimension is >= 0 and the product fits in index_t.
bool shape_product(const std::vector<index_t>& shape, std::uint64_t& out) {
  std::uint64_t n = 1;
  for (index_t d : shape) {
    if (d < 0 || !checked_mul(n, static_cast<std::uint64_t>(d), n)) return false;
  }
  if (n > static_cast<std::uint64_t>(std::numeric_limits<index_t>::max())) return false;
  out = n;
  return true;
}

/// Shortest decimal form of a double that reads back exactly ("1e+300", "0.1").
std::string format_double(double x) {
  std::array<char, 64> buf{};
  const auto res = std::to_chars(buf.data(), buf.data() + buf.size(), x);
  return std::string(buf.data(), res.ptr);
}

// ---------------------------------------------------------------------------------------------
// The header dictionary, as numpy writes it:
//   {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }
// and as other writers vary it (numpy reads it with ast.literal_eval): any key order, single or
// double quotes, any spacing, with or without the trailing comma, Python 2 longs (3L). A value
// is a string, True or False, an integer, or a tuple of those; a list is a structured dtype,
// taken whole (brackets counted, strings skipped) only to say that it is not supported. Nothing
// else of Python's literals (escapes, None, nesting) is part of a header we read.

struct HeaderValue {
  enum class Kind { string, integer, boolean, tuple, list };
  Kind kind = Kind::string;
  std::string str;                 // Kind::string
  std::int64_t integer = 0;        // Kind::integer, when integer_fits
  bool integer_fits = true;        // false when the literal does not fit in 64 bits
  bool boolean = false;            // Kind::boolean
  std::vector<HeaderValue> items;  // Kind::tuple: scalars only
  std::string_view source;         // the literal as written, for messages
};

class HeaderParser {
 public:
  HeaderParser(std::string_view text, const std::string& where) : text_(text), where_(where) {}

  /// The (key, value) pairs of the dictionary, in order; the text must hold nothing else but
  /// whitespace (numpy pads the header with spaces and a final newline).
  std::vector<std::pair<std::string, HeaderValue>> parse_dict() {
    std::vector<std::pair<std::string, HeaderValue>> entries;
    expect('{', "expected '{' (the header must be a Python dict literal)");
    while (!take('}')) {
      if (at_end()) fail("unterminated dictionary: expected '}'");
      if (peek() != '\'' && peek() != '"') fail("expected a quoted key or '}'");
      field_ = parse_string();
      expect(':', "expected ':' after the key");
      entries.emplace_back(field_, parse_value());
      skip_ws();
      if (at_end()) fail("unterminated dictionary: expected ',' or '}'");
      if (!take(',') && peek() != '}') fail("expected ',' or '}' after the value");
      field_.clear();
    }
    field_.clear();
    skip_ws();
    if (!at_end()) fail("unexpected text after the dictionary");
    return entries;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    detail::fail(ErrorKind::io, where_, "malformed header",
                 field_.empty() ? std::string() : " field '" + detail::printable(field_, 40, true) + "'", ": ", what,
                 " at offset ", pos_, " of ", detail::printable(text_, 120, true));
  }

  bool at_end() const { return pos_ >= text_.size(); }
  char peek() const { return text_[pos_]; }
  void skip_ws() {
    while (!at_end() && std::string_view(" \t\n\r\f\v").find(peek()) != std::string_view::npos) ++pos_;
  }
  // Skips whitespace, then consumes c if it comes next.
  bool take(char c) {
    skip_ws();
    if (at_end() || peek() != c) return false;
    ++pos_;
    return true;
  }
  void expect(char c, const char* what) {
    if (!take(c)) fail(what);
  }

  // A scalar, a tuple of scalars or a list (kept as written).
  HeaderValue parse_value() {
    skip_ws();
    const std::size_t start = pos_;
    HeaderValue v;
    if (!at_end() && peek() == '(') {
      v = parse_tuple();
    } else if (!at_end() && peek() == '[') {
      skip_list();
      v.kind = HeaderValue::Kind::list;
    } else {
      v = parse_scalar();
    }
    if (v.source.empty()) v.source = text_.substr(start, pos_ - start);
    return v;
  }

  HeaderValue parse_scalar() {
    skip_ws();
    if (at_end()) fail("expected a value");
    const std::size_t start = pos_;
    const char c = peek();
    HeaderValue v;
    if (c == '\'' || c == '"') {
      v.str = parse_string();
    } else if (c == '-' || c == '+' || (c >= '0' && c <= '9')) {
      v = parse_int();
    } else if (std::isalpha(static_cast<unsigned char>(c))) {
      while (!at_end() && (std::isalnum(static_cast<unsigned char>(peek())) || peek() == '_')) ++pos_;
      const std::string_view name = text_.substr(start, pos_ - start);
      if (name != "True" && name != "False") {
        pos_ = start;
        fail("unknown name '" + detail::printable(name, 40, true) + "' (expected a literal)");
      }
      v.kind = HeaderValue::Kind::boolean;
      v.boolean = name == "True";
    } else {
      fail("expected a value, found '" + detail::printable(text_.substr(pos_, 1), 120, true) + "'");
    }
    v.source = text_.substr(start, pos_ - start);
    return v;
  }

  // A quoted string without escapes (no header field needs one).
  std::string parse_string() {
    skip_ws();
    const char quote = peek();
    const std::size_t start = pos_++;
    const std::size_t end = text_.find_first_of(std::string{quote, '\n', '\\'}, pos_);
    if (end == std::string_view::npos || text_[end] != quote) {
      pos_ = start;
      fail(end != std::string_view::npos && text_[end] == '\\' ? "escape sequences are not part of a .npy header"
                                                                 : "unterminated string");
    }
    pos_ = end + 1;
    return std::string(text_.substr(start + 1, end - start - 1));
  }

  // '(' scalars ')'; "(x)" without a comma is a parenthesised x, not a tuple, as in Python.
  HeaderValue parse_tuple() {
    const std::size_t start = pos_++;
    HeaderValue v;
    v.kind = HeaderValue::Kind::tuple;
    bool comma = false;
    while (!take(')')) {
      if (at_end()) fail("unterminated tuple: expected ')'");
      if (peek() == '(' || peek() == '[') fail("a tuple holds numbers here, not another tuple or list");
      v.items.push_back(parse_scalar());
      skip_ws();
      if (at_end()) fail("unterminated tuple: expected ',' or ')'");
      if (take(',')) comma = true;
      else if (peek() != ')') fail("expected ',' or ')'");
    }
    if (v.items.size() == 1 && !comma) v = v.items.front();
    v.source = text_.substr(start, pos_ - start);
    return v;
  }

  // '[' to its matching ']', strings skipped.
  void skip_list() {
    const std::size_t start = pos_;
    for (std::size_t depth = 0; !at_end();) {
      const char c = text_[pos_];
      if (c == '\'' || c == '"') {
        parse_string();
        continue;
      }
      ++pos_;
      if (c == '[') ++depth;
      if (c == ']' && --depth == 0) return;
    }
    pos_ = start;
    fail("unterminated list: expected ']'");
  }

  HeaderValue parse_int() {
    HeaderValue v;
    v.kind = HeaderValue::Kind::integer;
    const bool negative = peek() == '-';
    if (peek() == '+' || peek() == '-') ++pos_;
    if (at_end() || peek() < '0' || peek() > '9') fail("expected digits after the sign");
    std::uint64_t magnitude = 0;
    for (; !at_end() && peek() >= '0' && peek() <= '9'; ++pos_) {
      const auto digit = static_cast<std::uint64_t>(peek() - '0');
      v.integer_fits = v.integer_fits && checked_mul(magnitude, 10, magnitude) &&
                       magnitude <= std::numeric_limits<std::uint64_t>::max() - digit;
      if (v.integer_fits) magnitude += digit;
    }
    if (!at_end() && (peek() == 'L' || peek() == 'l')) ++pos_;  // Python 2 long, as in old files
    // Magnitudes up to 2^63 - 1: the header's integers are sizes, and negative ones are refused.
    v.integer_fits = v.integer_fits && magnitude <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    if (v.integer_fits) v.integer = negative ? -static_cast<std::int64_t>(magnitude) : static_cast<std::int64_t>(magnitude);
    return v;
  }

  std::string_view text_;
  const std::string& where_;
  std::size_t pos_ = 0;
  std::string field_;  // the key whose value is being parsed, for messages
};

constexpr std::string_view kAccepted = "accepted: '<f4' (float32), '<f8' (float64), '<i8' (int64)";

DType interpret_descr(const HeaderValue& v, const std::string& where) {
  LEVATTN_REQUIRE_FILE(v.kind != HeaderValue::Kind::list, where, "header field 'descr': structured dtype ",
                       detail::printable(v.source, 120, true), " is not supported; ", kAccepted);
  LEVATTN_REQUIRE_FILE(v.kind == HeaderValue::Kind::string, where,
                       "header field 'descr': expected a dtype string such as '<f4', got ", detail::printable(v.source, 120, true));
  const std::string& s = v.str;
  if (s == "<f4") return DType::float32;
  if (s == "<f8") return DType::float64;
  if (s == "<i8") return DType::int64;
  const std::string found = detail::printable(s, 40, true);
  LEVATTN_REQUIRE_FILE(!(s == ">f4" || s == ">f8" || s == ">i8"), where, "header field 'descr': dtype '", found,
                       "' is big-endian; only little-endian data is supported (", kAccepted,
                       "; convert with astype('<", s.substr(1), "'))");
  detail::fail(ErrorKind::io, where, "header field 'descr': unsupported dtype '", found, "'",
               s.find('O') != std::string::npos ? " (object arrays cannot be read)" : "", "; ", kAccepted);
}

std::vector<index_t> interpret_shape(const HeaderValue& v, const std::string& where) {
  bool ok = v.kind == HeaderValue::Kind::tuple;
  for (std::size_t i = 0; ok && i < v.items.size(); ++i) {
    const HeaderValue& d = v.items[i];
    ok = d.kind == HeaderValue::Kind::integer && d.integer_fits && d.integer >= 0;
  }
  LEVATTN_REQUIRE_FILE(ok, where, "header field 'shape': expected a tuple of non-negative integers, got ",
                       detail::printable(v.source, 120, true));
  LEVATTN_REQUIRE_FILE(!v.items.empty(), where,
                       "header field 'shape': () is 0-D (a scalar); expected an array of 1 to 4 dimensions");
  LEVATTN_REQUIRE_FILE(v.items.size() <= kMaxDims, where, "header field 'shape': ", detail::printable(v.source, 120, true), " has ",
                       v.items.size(), " dimensions; expected 1 to 4");
  std::vector<index_t> shape;
  for (const HeaderValue& d : v.items) shape.push_back(d.integer);
  return shape;
}

// ---------------------------------------------------------------------------------------------
// Array helpers.

template <class T>
std::vector<T>& values_of(Array& a);
template <>
std::vector<float>& values_of<float>(Array& a) {
  return a.f32;
}
template <>
std::vector<double>& values_of<double>(Array& a) {
  return a.f64;
}
template <>
std::vector<std::int64_t>& values_of<std::int64_t>(Array& a) {
  return a.i64;
}

std::size_t active_count(const Array& a) {
  switch (a.dtype) {
    case DType::float32:
      return a.f32.size();
    case DType::float64:
      return a.f64.size();
    case DType::int64:
      return a.i64.size();
  }
  return 0;
}

template <class T>
Array make_array(DType dtype, std::vector<index_t> shape, std::vector<T> values,
                 const char* factory) {
  std::uint64_t n = 0;
  LEVATTN_REQUIRE(shape_product(shape, n), std::string("Array::") + factory, "shape ", detail::shape_string(shape),
                  " has a negative dimension or too many elements");
  LEVATTN_REQUIRE(n == values.size(), std::string("Array::") + factory, "shape ", detail::shape_string(shape),
                  " has ", n, " elements but ", values.size(), " values were given");
  Array a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  values_of<T>(a) = std::move(values);
  return a;
}

/// Reorders values stored with the first index varying fastest (Fortran order) into C order.
template <class T>
void fortran_to_c(std::vector<T>& values, const std::vector<index_t>& shape) {
  const std::size_t n = shape.size();
  if (n < 2 || values.empty()) return;
  std::array<std::size_t, kMaxDims> dim{};
  std::array<std::size_t, kMaxDims> stride{};  // Fortran strides, in elements
  std::size_t s = 1;
  for (std::size_t k = 0; k < n; ++k) {
    dim[k] = static_cast<std::size_t>(shape[k]);
    stride[k] = s;
    s *= dim[k];
  }
  std::vector<T> out(values.size());
  std::array<std::size_t, kMaxDims> idx{};
  std::size_t src = 0;  // sum of idx[k] * stride[k]
  for (std::size_t dst = 0; dst < out.size(); ++dst) {
    out[dst] = values[src];
    // Advance the C-order multi-index (last index fastest), carrying into earlier ones.
    for (std::size_t k = n; k-- > 0;) {
      src += stride[k];
      if (++idx[k] < dim[k]) break;
      src -= stride[k] * dim[k];
      idx[k] = 0;
    }
  }
  values.swap(out);
}

/// Closes a descriptor on scope exit.
struct FdCloser {
  int fd = -1;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

/// A random 64-bit value for temporary names; falls back on the clock and thread id where the
/// system has no random device.
std::uint64_t random_u64() {
  try {
    std::random_device rd;
    return (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
  } catch (const std::exception&) {
    const auto t =
        static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
    return t ^ (std::hash<std::thread::id>{}(std::this_thread::get_id()) * 0x9e3779b97f4a7c15ULL);
  }
}

std::string hex64(std::uint64_t v) {
  std::array<char, 17> buf{};
  const auto res = std::to_chars(buf.data(), buf.data() + buf.size(), v, 16);
  std::string s(buf.data(), res.ptr);
  return std::string(16 - s.size(), '0') + s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Array.

index_t Array::size() const {
  std::uint64_t n = 0;
  LEVATTN_REQUIRE(shape_product(shape, n), "Array::size", "shape ", detail::shape_string(shape),
                  " has a negative dimension or too many elements");
  return static_cast<index_t>(n);
}

Array Array::from_float32(std::vector<index_t> shape, std::vector<float> values) {
  return make_array(DType::float32, std::move(shape), std::move(values), "from_float32");
}
Array Array::from_float64(std::vector<index_t> shape, std::vector<double> values) {
  return make_array(DType::float64, std::move(shape), std::move(values), "from_float64");
}
Array Array::from_int64(std::vector<index_t> shape, std::vector<std::int64_t> values) {
  return make_array(DType::int64, std::move(shape), std::move(values), "from_int64");
}

// ---------------------------------------------------------------------------------------------
// detail: dtypes and arrays.

namespace detail {

std::size_t dtype_size(DType dtype) { return dtype == DType::float32 ? 4 : 8; }

std::string dtype_descr(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return "<f4";
    case DType::float64:
      return "<f8";
    case DType::int64:
      return "<i8";
  }
  return "?";
}

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return "float32";
    case DType::float64:
      return "float64";
    case DType::int64:
      return "int64";
  }
  return "?";
}

std::string shape_string(const std::vector<index_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

void check_writable(const Array& array, const std::string& where) {
  const std::string shape = shape_string(array.shape);
  LEVATTN_REQUIRE(!array.shape.empty(), where, "cannot write a 0-D array (shape ()); expected 1 to 4 dimensions");
  LEVATTN_REQUIRE(array.shape.size() <= kMaxDims, where, "shape ", shape, " has ", array.shape.size(),
                  " dimensions; expected 1 to 4");
  std::uint64_t n = 0;
  LEVATTN_REQUIRE(shape_product(array.shape, n), where, "shape ", shape,
                  " has a negative dimension or too many elements");
  const std::size_t have = active_count(array);
  LEVATTN_REQUIRE(have == n, where, "shape ", shape, " needs ", n, " ", dtype_name(array.dtype),
                  " values, the array holds ", have);
  const std::size_t total = array.f32.size() + array.f64.size() + array.i64.size();
  LEVATTN_REQUIRE(total == have, where, "a ", dtype_name(array.dtype),
                  " array must hold values only in the vector of its dtype (the others must be empty)");
}

std::span<std::uint8_t> mutable_value_bytes(Array& array) {
  void* p = nullptr;
  std::size_t n = 0;
  switch (array.dtype) {
    case DType::float32:
      p = array.f32.data();
      n = array.f32.size() * 4;
      break;
    case DType::float64:
      p = array.f64.data();
      n = array.f64.size() * 8;
      break;
    case DType::int64:
      p = array.i64.data();
      n = array.i64.size() * 8;
      break;
  }
  return {static_cast<std::uint8_t*>(p), n};
}

std::span<const std::uint8_t> value_bytes(const Array& array) {
  return mutable_value_bytes(const_cast<Array&>(array));  // reads only
}

// ---------------------------------------------------------------------------------------------
// detail: the .npy format.

NpyPreamble read_npy_preamble(std::span<const std::uint8_t> first_bytes, std::uint64_t total_size,
                              const std::string& where) {
  static constexpr std::uint8_t kMagic[6] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  const std::size_t have = static_cast<std::size_t>(
      std::min<std::uint64_t>(total_size, std::min(first_bytes.size(), kNpyPreambleBytes)));
  LEVATTN_REQUIRE_FILE(have < 6 || std::equal(kMagic, kMagic + 6, first_bytes.data()), where,
                       "not a .npy file (bad magic string; expected \\x93NUMPY)");
  LEVATTN_REQUIRE_FILE(have >= 10, where, "file is too short to be a .npy file (", total_size, " bytes)");
  NpyPreamble p;
  p.major = first_bytes[6];
  const int minor = first_bytes[7];
  LEVATTN_REQUIRE_FILE(p.major >= 1 && p.major <= 3 && minor == 0, where, "unsupported .npy format version ",
                       p.major, ".", minor, " (supported: 1.0, 2.0, 3.0)");
  std::uint64_t header_len = 0;
  if (p.major == 1) {
    p.dict_offset = 10;
    header_len = load_le16(first_bytes.data() + 8);
  } else {
    LEVATTN_REQUIRE_FILE(have >= 12, where, "file is too short to be a .npy file (", total_size, " bytes)");
    p.dict_offset = 12;
    header_len = load_le32(first_bytes.data() + 8);
  }
  p.data_offset = p.dict_offset + header_len;
  LEVATTN_REQUIRE_FILE(p.data_offset <= total_size, where, "header is truncated: the header length field says ",
                       header_len, " bytes, only ", total_size - p.dict_offset, " follow");
  return p;
}

NpyHeader parse_npy_header(const NpyPreamble& preamble, std::span<const std::uint8_t> head,
                           std::uint64_t total_size, const std::string& where) {
  if (head.size() != preamble.data_offset || preamble.data_offset > total_size)
    fail(ErrorKind::internal, where, "parse_npy_header called with an inconsistent head");
  const std::string_view text(reinterpret_cast<const char*>(head.data()) + preamble.dict_offset,
                              head.size() - preamble.dict_offset);
  const auto entries = HeaderParser(text, where).parse_dict();

  const HeaderValue* descr = nullptr;
  const HeaderValue* fortran = nullptr;
  const HeaderValue* shape = nullptr;
  for (const auto& [key, value] : entries) {
    const HeaderValue** slot = key == "descr"           ? &descr
                           : key == "fortran_order" ? &fortran
                           : key == "shape"         ? &shape
                                                    : nullptr;
    LEVATTN_REQUIRE_FILE(slot != nullptr, where, "header: unexpected key '", detail::printable(key, 40, true),
                         "' (a .npy header has exactly 'descr', 'fortran_order' and 'shape')");
    LEVATTN_REQUIRE_FILE(*slot == nullptr, where, "header: duplicate key '", detail::printable(key, 40, true), "'");
    *slot = &value;
  }
  for (const auto& [name, value] : {std::pair{"descr", descr}, std::pair{"fortran_order", fortran},
                                    std::pair{"shape", shape}})
    LEVATTN_REQUIRE_FILE(value != nullptr, where, "header: missing key '", name, "'");

  NpyHeader h;
  h.dtype = interpret_descr(*descr, where);
  LEVATTN_REQUIRE_FILE(fortran->kind == HeaderValue::Kind::boolean, where,
                       "header field 'fortran_order': expected True or False, got ", detail::printable(fortran->source, 120, true));
  h.fortran_order = fortran->boolean;
  h.shape = interpret_shape(*shape, where);
  h.data_offset = preamble.data_offset;

  const std::string shape_str = shape_string(h.shape);
  std::uint64_t count = 0;
  LEVATTN_REQUIRE_FILE(shape_product(h.shape, count) && checked_mul(count, dtype_size(h.dtype), h.data_bytes), where,
                       "header field 'shape': ", shape_str, " has too many elements (the size overflows)");
  const std::uint64_t have = total_size - h.data_offset;
  const std::string need = "header shape " + shape_str + " of " + dtype_descr(h.dtype) + " needs " +
                           std::to_string(h.data_bytes) + " bytes, file has " +
                           std::to_string(have);
  LEVATTN_REQUIRE_FILE(h.data_bytes <= have, where, "data is truncated: ", need);
  LEVATTN_REQUIRE_FILE(h.data_bytes >= have, where, "data has ", have - h.data_bytes, " trailing bytes: ", need);
  LEVATTN_REQUIRE_FILE(h.data_bytes <= static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()), where,
                       "array of ", need, " does not fit in this machine's memory");
  return h;
}

Array allocate_array(const NpyHeader& header, const std::string& where) {
  Array a;
  a.dtype = header.dtype;
  a.shape = header.shape;
  const auto n = static_cast<std::size_t>(header.data_bytes / dtype_size(header.dtype));
  try {
    switch (header.dtype) {
      case DType::float32:
        a.f32.resize(n);
        break;
      case DType::float64:
        a.f64.resize(n);
        break;
      case DType::int64:
        a.i64.resize(n);
        break;
    }
  } catch (const std::bad_alloc&) {
    allocation_failed(static_cast<double>(header.data_bytes), where,
                      dtype_name(header.dtype) + " " + shape_string(header.shape));
  }
  return a;
}

void finish_array(Array& array, const NpyHeader& header) {
  if (!header.fortran_order) return;
  switch (array.dtype) {
    case DType::float32:
      fortran_to_c(array.f32, array.shape);
      break;
    case DType::float64:
      fortran_to_c(array.f64, array.shape);
      break;
    case DType::int64:
      fortran_to_c(array.i64, array.shape);
      break;
  }
}

Array parse_npy(std::span<const std::uint8_t> bytes, const std::string& where) {
  const NpyPreamble pre = read_npy_preamble(bytes.first(std::min(bytes.size(), kNpyPreambleBytes)),
                                            bytes.size(), where);
  const NpyHeader h = parse_npy_header(pre, bytes.first(static_cast<std::size_t>(pre.data_offset)),
                                       bytes.size(), where);
  Array a = allocate_array(h, where);
  const auto out = mutable_value_bytes(a);
  if (!out.empty()) std::memcpy(out.data(), bytes.data() + h.data_offset, out.size());
  finish_array(a, h);
  return a;
}

std::vector<std::uint8_t> npy_header_bytes(const Array& array) {
  // Exactly what numpy (>= 1.23) writes: keys sorted, repr() values, then spaces that leave room
  // for the first dimension to grow to 21 digits, then spaces and '\n' up to a multiple of 64.
  std::string dict = "{'descr': '" + dtype_descr(array.dtype) +
                     "', 'fortran_order': False, 'shape': " + shape_string(array.shape) + ", }";
  const std::size_t first_digits = std::to_string(array.shape.front()).size();
  if (first_digits < 21) dict.append(21 - first_digits, ' ');
  constexpr std::size_t kPreamble = 10;  // magic, version, 2-byte header length
  const std::size_t pad = 64 - (kPreamble + dict.size() + 1) % 64;
  dict.append(pad, ' ');
  dict += '\n';

  std::vector<std::uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
  append_le16(out, static_cast<std::uint16_t>(dict.size()));  // at most a few hundred bytes
  out.insert(out.end(), dict.begin(), dict.end());
  return out;
}

// ---------------------------------------------------------------------------------------------
// detail: files.

InputFile::InputFile(const std::filesystem::path& path, std::string where)
    : where_(std::move(where)) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail(ErrorKind::io, where_, "cannot open: ", errno_message(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    ::close(fd_);
    fail(ErrorKind::io, where_, "cannot open: ", errno_message(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd_);
    fail(ErrorKind::io, where_,
         S_ISDIR(st.st_mode) ? "cannot open: Is a directory" : "cannot open: not a regular file");
  }
  size_ = static_cast<std::uint64_t>(st.st_size);
}

InputFile::~InputFile() {
  if (fd_ >= 0) ::close(fd_);
}

void InputFile::read_at(std::uint64_t offset, std::span<std::uint8_t> out) const {
  std::size_t done = 0;
  while (done < out.size()) {
    const std::size_t chunk = std::min<std::size_t>(out.size() - done, std::size_t{1} << 30);
    const ssize_t r = ::pread(fd_, out.data() + done, chunk, static_cast<off_t>(offset + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      fail(ErrorKind::io, where_, "read failed: ", errno_message(errno));
    }
    LEVATTN_REQUIRE_FILE(r != 0, where_, "file became shorter while it was being read");
    done += static_cast<std::size_t>(r);
  }
}

std::vector<std::uint8_t> read_file(const std::filesystem::path& path, const std::string& where) {
  const InputFile file(path, where);
  LEVATTN_REQUIRE_FILE(file.size() <= static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()), where,
                       "file is too large for this machine's memory");
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(file.size()));
  file.read_at(0, bytes);
  return bytes;
}

void write_file_atomically(const std::filesystem::path& path,
                           std::span<const std::span<const std::uint8_t>> pieces) {
  const std::string where = path.string();

  // The temporary file: O_EXCL so that concurrent writers (threads, processes) never share one.
  struct Temp {
    int fd = -1;
    std::string name;
    bool committed = false;
    ~Temp() {
      if (fd >= 0) ::close(fd);
      if (!committed && !name.empty()) ::unlink(name.c_str());
    }
  } temp;
  for (int attempt = 0; attempt < 64 && temp.fd < 0; ++attempt) {
    std::string name = where + ".tmp." + hex64(random_u64());
    const int fd = ::open(name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0) {
      temp.fd = fd;
      temp.name = std::move(name);
    } else if (errno != EEXIST) {
      fail(ErrorKind::io, where, "cannot create temporary file '", name, "': ", errno_message(errno));
    }
  }
  if (temp.fd < 0) fail(ErrorKind::io, where, "cannot create a temporary file (names all taken)");

  for (const auto piece : pieces) {
    std::size_t done = 0;
    while (done < piece.size()) {
      const std::size_t chunk = std::min<std::size_t>(piece.size() - done, std::size_t{1} << 30);
      const ssize_t w = ::write(temp.fd, piece.data() + done, chunk);
      if (w < 0) {
        if (errno == EINTR) continue;
        fail(ErrorKind::io, where, "cannot write '", temp.name, "': ", errno_message(errno));
      }
      if (w == 0) fail(ErrorKind::io, where, "cannot write '", temp.name, "': no progress");
      done += static_cast<std::size_t>(w);
    }
  }
  // The data must be on disk before the rename makes it visible under `path`, or a crash could
  // leave an empty or partial file in place of the old one.
  if (::fsync(temp.fd) != 0) {
    fail(ErrorKind::io, where, "cannot flush '", temp.name, "': ", errno_message(errno));
  }
  const int fd = std::exchange(temp.fd, -1);
  if (::close(fd) != 0) {
    fail(ErrorKind::io, where, "cannot close '", temp.name, "': ", errno_message(errno));
  }
  if (::rename(temp.name.c_str(), where.c_str()) != 0) {
    fail(ErrorKind::io, where, "cannot rename '", temp.name, "' over it: ", errno_message(errno));
  }
  temp.committed = true;

  // Make the rename itself durable. Best effort: some file systems refuse fsync on directories,
  // and the new file is already complete and in place.
  std::filesystem::path dir = path.parent_path();
  if (dir.empty()) dir = ".";
  FdCloser d{::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC)};
  if (d.fd >= 0) (void)::fsync(d.fd);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Public API.

detail::NpyHeader detail::read_npy_file_header(const InputFile& file, const std::string& where) {
  const std::uint64_t size = file.size();
  std::array<std::uint8_t, kNpyPreambleBytes> first{};
  const auto first_len = static_cast<std::size_t>(std::min<std::uint64_t>(size, kNpyPreambleBytes));
  file.read_at(0, std::span(first).first(first_len));
  const NpyPreamble pre = read_npy_preamble(std::span(first).first(first_len), size, where);
  std::vector<std::uint8_t> head(static_cast<std::size_t>(pre.data_offset));
  file.read_at(0, head);
  return parse_npy_header(pre, head, size, where);
}

Array read_npy(const std::filesystem::path& path) {
  const std::string where = path.string();
  const detail::InputFile file(path, where);
  // The header, then the data straight into the array, which parse_npy_header has sized
  // against the file.
  const detail::NpyHeader h = detail::read_npy_file_header(file, where);
  Array a = detail::allocate_array(h, where);
  file.read_at(h.data_offset, detail::mutable_value_bytes(a));
  detail::finish_array(a, h);
  return a;
}

void write_npy(const std::filesystem::path& path, const Array& array) {
  detail::check_writable(array, path.string());
  const std::vector<std::uint8_t> header = detail::npy_header_bytes(array);
  const std::array<std::span<const std::uint8_t>, 2> pieces = {std::span(header),
                                                               detail::value_bytes(array)};
  detail::write_file_atomically(path, pieces);
}

std::vector<float> to_float32(const Array& array, const std::string& what) {
  LEVATTN_REQUIRE(array.dtype != DType::int64, what, "expected a float32 or float64 array, got int64");
  std::uint64_t n = 0;
  LEVATTN_REQUIRE(shape_product(array.shape, n) && n == active_count(array), what, "shape ",
                  detail::shape_string(array.shape), " does not match the ", active_count(array),
                  " values the array holds");
  if (array.dtype == DType::float32) return array.f32;
  std::vector<float> out(array.f64.size());
  for (std::size_t i = 0; i < out.size(); ++i) {
    const double x = array.f64[i];
    LEVATTN_REQUIRE(!(std::isfinite(x) && std::fabs(x) > static_cast<double>(FLT_MAX)), what, "value ",
                    format_double(x), " at flat index ", i, " is outside the float32 range");
    out[i] = static_cast<float>(x);  // NaN and Inf pass through
  }
  return out;
}

namespace {

constexpr std::pair<DType, const char*> kDTypeNames[] = {
    {DType::float32, "float32"}, {DType::float64, "float64"}, {DType::int64, "int64"}};

}  // namespace

std::string to_string(DType dtype) { return detail::name_of(kDTypeNames, dtype); }
DType parse_dtype(const std::string& name) { return detail::parse_name(kDTypeNames, name, "dtype"); }

}  // namespace levattn
