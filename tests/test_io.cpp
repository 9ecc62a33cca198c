// test_io.cpp: .npy / .npz reading and writing (levattn/io.hpp).
//
// Files "written by numpy" are built here byte for byte as numpy writes them (the layouts were
// checked against numpy 1.24's np.save / np.savez / np.savez_compressed). Two .npz tests also run
// numpy itself (LEVATTN_PYTHON), one on archives numpy writes and one on archives numpy reads.
// Hostile inputs are built by hand or by damaging valid files.
#include <gtest/gtest.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "levattn/error.hpp"
#include "levattn/io.hpp"

namespace {

namespace fs = std::filesystem;
using levattn::Array;
using levattn::DType;
using levattn::Error;
using levattn::ErrorKind;
using levattn::index_t;
using Bytes = std::vector<std::uint8_t>;

static_assert(std::endian::native == std::endian::little, "the byte builders assume little-endian");

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A fresh directory per test, removed afterwards.
class IoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::random_device rd;
    dir_ = fs::temp_directory_path() / ("levattn_test_io_" + std::string(info->name()) + "_" +
                                        std::to_string(rd()) + std::to_string(rd()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path path(const std::string& name) const { return dir_ / name; }
  /// The names in the test directory (to see that no temporary file was left behind).
  std::vector<std::string> listing() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_))
      names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path dir_;
};

void write_bytes(const fs::path& p, const Bytes& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(f.good()) << p;
}

Bytes read_bytes(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

template <class T>
Bytes le_bytes(const std::vector<T>& v) {
  Bytes b(v.size() * sizeof(T));
  if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

void put16(Bytes& b, std::uint64_t v) {
  for (int i = 0; i < 2; ++i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void put32(Bytes& b, std::uint64_t v) {
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void put64(Bytes& b, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void append(Bytes& b, const std::string& s) { b.insert(b.end(), s.begin(), s.end()); }
void append(Bytes& b, const Bytes& s) { b.insert(b.end(), s.begin(), s.end()); }

/// A .npy image with `header` used exactly as given (no padding) and the given version.
Bytes npy_raw(const std::string& header, const Bytes& data, int major = 1, int minor = 0) {
  Bytes b = {0x93,
             'N',
             'U',
             'M',
             'P',
             'Y',
             static_cast<std::uint8_t>(major),
             static_cast<std::uint8_t>(minor)};
  if (major == 1) {
    put16(b, header.size());
  } else {
    put32(b, header.size());
  }
  append(b, header);
  append(b, data);
  return b;
}

/// A .npy image as numpy writes it: `dict` padded with spaces and '\n' so that the data starts
/// at a multiple of 64 (numpy also inserts the 21-digit growth room, which is spaces as well).
Bytes npy_file(const std::string& dict, const Bytes& data, int major = 1) {
  const std::size_t preamble = major == 1 ? 10 : 12;
  std::string header = dict;
  header.append(64 - (preamble + header.size() + 1) % 64, ' ');
  header += '\n';
  return npy_raw(header, data, major);
}

/// The message of the levattn::Error `f` throws; a test failure if it throws nothing, another
/// exception type, or an Error of another kind.
std::string error_of(const std::function<void()>& f, ErrorKind kind) {
  try {
    f();
  } catch (const Error& e) {
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << e.what();
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected levattn::Error, got std::exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected levattn::Error, nothing was thrown";
  return {};
}

#define EXPECT_CONTAINS(haystack, needle)                          \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) \
      << "expected to find \"" << (needle) << "\" in \"" << (haystack) << "\""

#define EXPECT_STARTS_WITH(haystack, prefix)            \
  EXPECT_EQ(std::string(haystack).rfind(prefix, 0), 0u) \
      << "expected \"" << (haystack) << "\" to start with \"" << (prefix) << "\""

/// The error message read_npy gives for a file with these bytes; checks kind io and path prefix.
std::string npy_error(const fs::path& p, const Bytes& bytes) {
  write_bytes(p, bytes);
  const std::string msg = error_of([&] { (void)levattn::read_npy(p); }, ErrorKind::io);
  EXPECT_STARTS_WITH(msg, p.string() + ": ");
  return msg;
}

std::vector<float> f32_values(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i) * 0.5f - 3.25f;
  return v;
}
std::vector<double> f64_values(std::size_t n) {
  std::vector<double> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<double>(i) * 1e-3 - 1.0 / 3.0;
  return v;
}
std::vector<std::int64_t> i64_values(std::size_t n) {
  std::vector<std::int64_t> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    v[i] = static_cast<std::int64_t>(i) * 1000003 - (std::int64_t{1} << 40);
  }
  return v;
}

/// Bitwise equality of two arrays (NaN payloads and -0.0 included).
void expect_same(const Array& a, const Array& b) {
  EXPECT_EQ(static_cast<int>(a.dtype), static_cast<int>(b.dtype));
  EXPECT_EQ(a.shape, b.shape);
  EXPECT_EQ(le_bytes(a.f32), le_bytes(b.f32));
  EXPECT_EQ(le_bytes(a.f64), le_bytes(b.f64));
  EXPECT_EQ(a.i64, b.i64);
}

// ---- ZIP builder, mirroring what numpy's savez writes ----

std::uint32_t crc_of(const Bytes& b) {
  return static_cast<std::uint32_t>(::crc32(0L, b.data(), static_cast<uInt>(b.size())));
}

struct ZipEntry {
  std::string name;
  Bytes stored;            // bytes as they are in the archive (compressed for method 8)
  std::uint32_t crc = 0;   // of the uncompressed bytes
  std::uint64_t size = 0;  // uncompressed size
  std::uint16_t method = 0;
  std::uint16_t flags = 0;
  bool local_zip64 = true;     // numpy's savez writes a local ZIP64 extra (force_zip64=True)
  bool central_zip64 = false;  // sizes and offset moved into a central ZIP64 extra
};

ZipEntry stored_entry(const std::string& name, const Bytes& npy) {
  ZipEntry e;
  e.name = name;
  e.stored = npy;
  e.crc = crc_of(npy);
  e.size = npy.size();
  return e;
}

Bytes deflate_raw(const Bytes& in) {
  z_stream zs{};
  EXPECT_EQ(deflateInit2(&zs, Z_BEST_COMPRESSION, Z_DEFLATED, -MAX_WBITS, 8, Z_DEFAULT_STRATEGY),
            Z_OK);
  Bytes out(deflateBound(&zs, static_cast<uLong>(in.size())));
  zs.next_in = const_cast<Bytef*>(in.data());
  zs.avail_in = static_cast<uInt>(in.size());
  zs.next_out = out.data();
  zs.avail_out = static_cast<uInt>(out.size());
  EXPECT_EQ(deflate(&zs, Z_FINISH), Z_STREAM_END);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

ZipEntry deflated_entry(const std::string& name, const Bytes& npy) {
  ZipEntry e = stored_entry(name, npy);
  e.stored = deflate_raw(npy);
  e.method = 8;
  e.local_zip64 = false;  // as savez_compressed writes small members
  return e;
}

/// Offsets of the records in a built archive, to damage them in tests.
struct ZipLayout {
  std::vector<std::size_t> local;    // local header of each entry
  std::vector<std::size_t> data;     // data of each entry
  std::vector<std::size_t> central;  // central directory entry of each entry
  std::size_t eocd = 0;
};

Bytes build_zip(const std::vector<ZipEntry>& entries, bool zip64_end = false,
                ZipLayout* layout = nullptr) {
  ZipLayout lay;
  Bytes out;
  std::vector<std::uint64_t> offsets;
  for (const ZipEntry& e : entries) {
    offsets.push_back(out.size());
    lay.local.push_back(out.size());
    put32(out, 0x04034b50);
    put16(out, 20);  // numpy writes 2.0 even with the ZIP64 extra (its sizes fit 32 bits)
    put16(out, e.flags);
    put16(out, e.method);
    put16(out, 0);
    put16(out, 0x21);  // 1980-01-01
    put32(out, e.crc);
    put32(out, e.stored.size());
    put32(out, e.size);
    put16(out, e.name.size());
    put16(out, e.local_zip64 ? 20 : 0);
    append(out, e.name);
    if (e.local_zip64) {
      put16(out, 1);
      put16(out, 16);
      put64(out, e.size);
      put64(out, e.stored.size());
    }
    lay.data.push_back(out.size());
    append(out, e.stored);
  }
  const std::uint64_t cd_offset = out.size();
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const ZipEntry& e = entries[i];
    lay.central.push_back(out.size());
    put32(out, 0x02014b50);
    put16(out, (3 << 8) | 20);
    put16(out, 20);
    put16(out, e.flags);
    put16(out, e.method);
    put16(out, 0);
    put16(out, 0x21);
    put32(out, e.crc);
    put32(out, e.central_zip64 ? 0xFFFFFFFFu : e.stored.size());
    put32(out, e.central_zip64 ? 0xFFFFFFFFu : e.size);
    put16(out, e.name.size());
    put16(out, e.central_zip64 ? 28 : 0);
    put16(out, 0);
    put16(out, 0);
    put16(out, 0);
    put32(out, 0600u << 16);
    put32(out, e.central_zip64 ? 0xFFFFFFFFu : offsets[i]);
    append(out, e.name);
    if (e.central_zip64) {
      put16(out, 1);
      put16(out, 24);
      put64(out, e.size);  // uncompressed, compressed, offset: the order of the spec
      put64(out, e.stored.size());
      put64(out, offsets[i]);
    }
  }
  const std::uint64_t cd_size = out.size() - cd_offset;
  if (zip64_end) {
    const std::uint64_t z64 = out.size();
    put32(out, 0x06064b50);
    put64(out, 44);
    put16(out, 45);
    put16(out, 45);
    put32(out, 0);
    put32(out, 0);
    put64(out, entries.size());
    put64(out, entries.size());
    put64(out, cd_size);
    put64(out, cd_offset);
    put32(out, 0x07064b50);
    put32(out, 0);
    put64(out, z64);
    put32(out, 1);
  }
  lay.eocd = out.size();
  put32(out, 0x06054b50);
  put16(out, 0);
  put16(out, 0);
  put16(out, zip64_end ? 0xFFFF : entries.size());
  put16(out, zip64_end ? 0xFFFF : entries.size());
  put32(out, zip64_end ? 0xFFFFFFFFu : cd_size);
  put32(out, zip64_end ? 0xFFFFFFFFu : cd_offset);
  put16(out, 0);
  if (layout != nullptr) *layout = lay;
  return out;
}

/// np.save(np.arange(12, dtype='<f4').reshape(3, 4)), byte for byte.
Bytes numpy_arange_3x4_f4() {
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[static_cast<std::size_t>(i)] = static_cast<float>(i);
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }";
  header.append(58, ' ');  // 59 + 58 + 1 = 118 = 0x76
  header += '\n';
  return npy_raw(header, le_bytes(v));
}

/// np.save(np.arange(3)) (int64), byte for byte.
Bytes numpy_arange_3_i8() {
  std::string header = "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }";
  header.append(60, ' ');  // 57 + 60 + 1 = 118
  header += '\n';
  return npy_raw(header, le_bytes(std::vector<std::int64_t>{0, 1, 2}));
}

// ---------------------------------------------------------------------------------------------
// Array.

TEST(IoArray, SizeAndFactories) {
  EXPECT_EQ(Array::from_float32({3, 4}, std::vector<float>(12)).size(), 12);
  EXPECT_EQ(Array::from_float64({0, 5}, {}).size(), 0);
  Array scalar;
  EXPECT_EQ(scalar.size(), 1);  // 0-D

  const Array a = Array::from_int64({2, 1, 3}, {1, 2, 3, 4, 5, 6});
  EXPECT_EQ(static_cast<int>(a.dtype), static_cast<int>(DType::int64));
  EXPECT_EQ(a.i64.size(), 6u);
  EXPECT_TRUE(a.f32.empty() && a.f64.empty());

  const std::string msg = error_of(
      [] {
        (void)Array::from_float32({3, 4}, std::vector<float>(10));
      },
      ErrorKind::invalid_argument);
  EXPECT_CONTAINS(msg, "(3, 4)");
  EXPECT_CONTAINS(msg, "10 values");
  error_of(
      [] {
        (void)Array::from_float64({3, -4}, std::vector<double>(12));
      },
      ErrorKind::invalid_argument);
}

// ---------------------------------------------------------------------------------------------
// .npy round trips and numpy compatibility.

TEST_F(IoTest, NpyRoundTripEveryDtypeAndRank) {
  const std::vector<std::vector<index_t>> shapes = {{5}, {2, 3}, {2, 3, 4}, {2, 1, 3, 2}};
  for (const auto& shape : shapes) {
    std::size_t n = 1;
    for (index_t d : shape) n *= static_cast<std::size_t>(d);
    std::vector<float> f = f32_values(n);
    f[0] = std::numeric_limits<float>::quiet_NaN();
    f[n - 1] = -0.0f;
    std::vector<double> d = f64_values(n);
    d[0] = -std::numeric_limits<double>::infinity();
    d[n - 1] = std::numeric_limits<double>::denorm_min();
    std::vector<std::int64_t> i = i64_values(n);
    i[0] = std::numeric_limits<std::int64_t>::min();
    i[n - 1] = std::numeric_limits<std::int64_t>::max();
    for (const Array& a : {Array::from_float32(shape, f), Array::from_float64(shape, d),
                           Array::from_int64(shape, i)}) {
      const fs::path p = path("rt.npy");
      levattn::write_npy(p, a);
      expect_same(levattn::read_npy(p), a);
      // Data aligned to 64 bytes, as numpy writes it.
      const Bytes bytes = read_bytes(p);
      ASSERT_GE(bytes.size(), 10u);
      const std::size_t data_offset = 10 + (bytes[8] | (bytes[9] << 8));
      EXPECT_EQ(data_offset % 64, 0u);
      EXPECT_EQ(bytes.size() - data_offset, n * (a.dtype == DType::float32 ? 4 : 8));
    }
  }
  EXPECT_EQ(listing(), std::vector<std::string>{"rt.npy"});
}

TEST_F(IoTest, WriteNpyIsByteIdenticalToNumpy) {
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[static_cast<std::size_t>(i)] = static_cast<float>(i);
  levattn::write_npy(path("a.npy"), Array::from_float32({3, 4}, v));
  EXPECT_EQ(read_bytes(path("a.npy")), numpy_arange_3x4_f4());

  levattn::write_npy(path("b.npy"), Array::from_int64({3}, {0, 1, 2}));
  EXPECT_EQ(read_bytes(path("b.npy")), numpy_arange_3_i8());
}

TEST_F(IoTest, ReadsNumpyFiles) {
  write_bytes(path("a.npy"), numpy_arange_3x4_f4());
  const Array a = levattn::read_npy(path("a.npy"));
  EXPECT_EQ(static_cast<int>(a.dtype), static_cast<int>(DType::float32));
  EXPECT_EQ(a.shape, (std::vector<index_t>{3, 4}));
  ASSERT_EQ(a.f32.size(), 12u);
  EXPECT_EQ(a.f32[0], 0.0f);
  EXPECT_EQ(a.f32[7], 7.0f);  // row 1, column 3
  EXPECT_EQ(a.f32[11], 11.0f);

  write_bytes(path("b.npy"), numpy_arange_3_i8());
  const Array b = levattn::read_npy(path("b.npy"));
  EXPECT_EQ(b.shape, (std::vector<index_t>{3}));
  EXPECT_EQ(b.i64, (std::vector<std::int64_t>{0, 1, 2}));
}

TEST_F(IoTest, ReadsVersion2And3Headers) {
  const std::vector<double> values = {1.5, -2.5, 3.25, 1e300, -0.0, 6.0};
  for (int major : {2, 3}) {
    // Not "v" + std::to_string(...): GCC 12 gives a false -Wrestrict warning on it at -O2.
    const fs::path p = path(std::to_string(major) + ".npy");
    const Bytes bytes = npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }",
                                 le_bytes(values), major);
    EXPECT_EQ((bytes[8] | (bytes[9] << 8)) + 12u + 48u, bytes.size());  // 4-byte length field
    write_bytes(p, bytes);
    const Array a = levattn::read_npy(p);
    EXPECT_EQ(a.shape, (std::vector<index_t>{2, 3}));
    EXPECT_EQ(a.f64, values);
  }
}

TEST_F(IoTest, ReadsFortranOrderIntoCOrder) {
  // 2-D (2, 3): C order is [[0, 1, 2], [3, 4, 5]]; Fortran order stores the columns.
  write_bytes(path("f2.npy"), npy_file("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                                       le_bytes(std::vector<float>{0, 3, 1, 4, 2, 5})));
  EXPECT_EQ(levattn::read_npy(path("f2.npy")).f32, (std::vector<float>{0, 1, 2, 3, 4, 5}));

  // 3-D (2, 3, 4) float64 and 4-D (2, 3, 2, 2) int64: element (i, j, k[, l]) holds the number
  // whose decimal digits are its indices; Fortran order has the first index varying fastest.
  {
    std::vector<double> fortran;
    std::vector<double> c_order;
    for (int k = 0; k < 4; ++k)
      for (int j = 0; j < 3; ++j)
        for (int i = 0; i < 2; ++i) fortran.push_back(100 * i + 10 * j + k);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j)
        for (int k = 0; k < 4; ++k) c_order.push_back(100 * i + 10 * j + k);
    write_bytes(path("f3.npy"),
                npy_file("{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3, 4), }",
                         le_bytes(fortran)));
    const Array a = levattn::read_npy(path("f3.npy"));
    EXPECT_EQ(a.shape, (std::vector<index_t>{2, 3, 4}));
    EXPECT_EQ(a.f64, c_order);
  }
  {
    std::vector<std::int64_t> fortran;
    std::vector<std::int64_t> c_order;
    for (int l = 0; l < 2; ++l)
      for (int k = 0; k < 2; ++k)
        for (int j = 0; j < 3; ++j)
          for (int i = 0; i < 2; ++i) fortran.push_back(1000 * i + 100 * j + 10 * k + l);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 3; ++j)
        for (int k = 0; k < 2; ++k)
          for (int l = 0; l < 2; ++l) c_order.push_back(1000 * i + 100 * j + 10 * k + l);
    // As numpy 1.24 writes np.asfortranarray(...) with version 2.0 for the test's sake.
    write_bytes(path("f4.npy"),
                npy_file("{'descr': '<i8', 'fortran_order': True, 'shape': (2, 3, 2, 2), }",
                         le_bytes(fortran), 2));
    const Array a = levattn::read_npy(path("f4.npy"));
    EXPECT_EQ(a.shape, (std::vector<index_t>{2, 3, 2, 2}));
    EXPECT_EQ(a.i64, c_order);
  }
}

TEST_F(IoTest, ReadsHeaderVariantsThatNumpyAccepts) {
  const Bytes data = le_bytes(std::vector<float>{1, 2, 3, 4, 5, 6});
  const std::vector<std::string> headers = {
      "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",  // double quotes
      "{'shape': (2, 3), 'fortran_order': False, 'descr': '<f4'}",          // any key order
      "{ 'descr' : '<f4' ,'fortran_order':False,'shape':( 2 ,3 , ) , }",    // spacing
      "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }",      // Python 2 longs
  };
  for (const std::string& h : headers) {
    write_bytes(path("v.npy"), npy_raw(h + "\n", data));  // unaligned data is accepted
    const Array a = levattn::read_npy(path("v.npy"));
    EXPECT_EQ(a.shape, (std::vector<index_t>{2, 3})) << h;
    EXPECT_EQ(a.f32, (std::vector<float>{1, 2, 3, 4, 5, 6})) << h;
  }
}

TEST_F(IoTest, ReadsEmptyArrays) {
  write_bytes(path("e.npy"),
              npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", {}));
  const Array a = levattn::read_npy(path("e.npy"));
  EXPECT_EQ(a.shape, (std::vector<index_t>{0, 3}));
  EXPECT_EQ(a.size(), 0);
  EXPECT_TRUE(a.f32.empty());

  write_bytes(path("e2.npy"),
              npy_file("{'descr': '<i8', 'fortran_order': True, 'shape': (4, 0, 2), }", {}));
  EXPECT_EQ(levattn::read_npy(path("e2.npy")).shape, (std::vector<index_t>{4, 0, 2}));

  levattn::write_npy(path("e3.npy"), Array::from_float64({2, 0}, {}));
  EXPECT_EQ(levattn::read_npy(path("e3.npy")).shape, (std::vector<index_t>{2, 0}));
}

// ---------------------------------------------------------------------------------------------
// .npy: every kind of bad input.

TEST_F(IoTest, NpyTruncatedData) {
  const fs::path p = path("X.npy");
  const std::string msg = npy_error(
      p, npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", Bytes(20, 0)));
  EXPECT_EQ(msg, p.string() +
                     ": data is truncated: header shape (3, 4) of <f4 needs 48 bytes, file has 20");
}

TEST_F(IoTest, NpyTrailingBytes) {
  const fs::path p = path("X.npy");
  const std::string msg = npy_error(
      p, npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }", Bytes(56, 0)));
  EXPECT_CONTAINS(msg, "8 trailing bytes");
  EXPECT_CONTAINS(msg, "needs 48 bytes, file has 56");
}

TEST_F(IoTest, NpyLyingOrOverflowingShape) {
  const fs::path p = path("L.npy");
  const Bytes small(64, 0);
  // A shape far larger than the data: rejected from the file size, nothing allocated.
  EXPECT_CONTAINS(npy_error(p, npy_file("{'descr': '<f8', 'fortran_order': False, "
                                        "'shape': (1000000, 1000000), }",
                                        small)),
                  "data is truncated: header shape (1000000, 1000000) of <f8 needs 8000000000000 "
                  "bytes, file has 64");
  EXPECT_CONTAINS(npy_error(p, npy_file("{'descr': '<f4', 'fortran_order': False, "
                                        "'shape': (2305843009213693952,), }",
                                        small)),
                  "data is truncated");
  // Products that overflow 64 bits (2**62 * 8 elements; 2**62 elements of 8 bytes).
  for (const std::string shape : {"(4611686018427387904, 8)", "(4611686018427387904,)",
                                  "(1099511627776, 1099511627776, 16)"}) {
    const std::string msg = npy_error(
        p, npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': " + shape + ", }", small));
    EXPECT_CONTAINS(msg, "header field 'shape'");
    EXPECT_CONTAINS(msg, "overflow");
  }
  // Negative and too-large dimensions.
  for (const std::string shape : {"(3, -1)", "(99999999999999999999999, 2)", "(3, 'a')"}) {
    const std::string msg = npy_error(
        p, npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }", small));
    EXPECT_CONTAINS(msg, "header field 'shape': expected a tuple of non-negative integers");
  }
}

TEST_F(IoTest, NpyBigEndianIsRejected) {
  const fs::path p = path("B.npy");
  for (const std::string descr : {">f4", ">f8", ">i8"}) {
    const std::string msg =
        npy_error(p, npy_file("{'descr': '" + descr + "', 'fortran_order': False, 'shape': (2,), }",
                              Bytes(descr == ">f4" ? 8 : 16, 0)));
    EXPECT_CONTAINS(msg, "header field 'descr'");
    EXPECT_CONTAINS(msg, "'" + descr + "' is big-endian");
    EXPECT_CONTAINS(msg, "'<f4'");
  }
}

TEST_F(IoTest, NpyUnsupportedDtypes) {
  const fs::path p = path("D.npy");
  for (const std::string descr : {"|O", "<U5", "<i4", "|u1", "|f4", "<f2", "<c8", "|b1", "=f4"}) {
    const std::string msg =
        npy_error(p, npy_file("{'descr': '" + descr + "', 'fortran_order': False, 'shape': (2,), }",
                              Bytes(8, 0)));
    EXPECT_CONTAINS(msg, "header field 'descr': unsupported dtype '" + descr + "'");
    EXPECT_CONTAINS(msg, "accepted: '<f4' (float32), '<f8' (float64), '<i8' (int64)");
  }
  EXPECT_CONTAINS(npy_error(p, npy_file("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }",
                                        Bytes(8, 0))),
                  "object");
  const std::string msg =
      npy_error(p, npy_file("{'descr': [('a', '<f4'), ('b', '<i8')], 'fortran_order': False, "
                            "'shape': (2,), }",
                            Bytes(24, 0)));
  EXPECT_CONTAINS(msg, "header field 'descr': structured dtype");
  // A list is taken whole, brackets counted and strings (which may hold brackets) skipped.
  EXPECT_CONTAINS(npy_error(p, npy_file("{'descr': [('a]', '<f4'), ('b', [('c', '<i8')])], 'fortran_order': False, "
                                        "'shape': (2,), }",
                                        Bytes(24, 0))),
                  "structured dtype [('a]', '<f4'), ('b', [('c', '<i8')])] is not supported");
  EXPECT_CONTAINS(
      npy_error(p, npy_file("{'descr': 4, 'fortran_order': False, 'shape': (2,), }", Bytes(8, 0))),
      "header field 'descr': expected a dtype string");
}

TEST_F(IoTest, NpyZeroAndFiveDimensionsAreRejected) {
  const fs::path p = path("S.npy");
  const std::string zero = npy_error(
      p, npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", Bytes(4, 0)));
  EXPECT_CONTAINS(zero, "header field 'shape'");
  EXPECT_CONTAINS(zero, "0-D");
  const std::string five =
      npy_error(p, npy_file("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 2), }",
                            Bytes(8, 0)));
  EXPECT_CONTAINS(five, "header field 'shape'");
  EXPECT_CONTAINS(five, "5 dimensions; expected 1 to 4");
}

TEST_F(IoTest, NpyMalformedHeaders) {
  const fs::path p = path("M.npy");
  const Bytes data(12, 0);
  struct Case {
    std::string header;
    std::string expected;
  };
  const std::vector<Case> cases = {
      {"{'descr': '<f4', 'fortran_order': False, }", "header: missing key 'shape'"},
      {"{'fortran_order': False, 'shape': (3,), }", "header: missing key 'descr'"},
      {"{'descr': '<f4', 'shape': (3,), }", "header: missing key 'fortran_order'"},
      {"{'descr': '<f4, 'fortran_order': False, 'shape': (3,), }", "malformed header"},
      {"{'descr': '<f4", "malformed header field 'descr': unterminated string"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), ",
       "malformed header: unterminated dictionary"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,",
       "field 'shape': unterminated tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3, x), }",
       "malformed header field 'shape': unknown name 'x'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3; 1), }",
       "malformed header field 'shape': expected ',' or ')'"},
      {"{'descr': '<f4', 'fortran_order': 'yes', 'shape': (3,), }",
       "header field 'fortran_order': expected True or False, got 'yes'"},
      {"{'descr': '<f4', 'fortran_order': 1, 'shape': (3,), }",
       "header field 'fortran_order': expected True or False"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3), }",
       "header field 'shape': expected a tuple of non-negative integers, got (3)"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': [3], }",
       "header field 'shape': expected a tuple"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'shape': (3,), }",
       "header: duplicate key 'shape'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'extra': 1, }",
       "header: unexpected key 'extra'"},
      {"{'descr': '<f4' 'fortran_order': False, 'shape': (3,), }",
       "malformed header field 'descr': expected ',' or '}'"},
      {"{'descr' '<f4', 'fortran_order': False, 'shape': (3,), }",
       "malformed header field 'descr': expected ':'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), } junk",
       "malformed header: unexpected text after the dictionary"},
      {"['descr', '<f4']", "malformed header: expected '{'"},
      {"", "malformed header: expected '{'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': " + std::string(5000, '(') + "3,), }",
       "malformed header field 'shape': a tuple holds numbers here, not another tuple or list"},
      {"{'descr': " + std::string(5000, '[') + ", 'fortran_order': False, 'shape': (3,), }",
       "malformed header field 'descr': unterminated list: expected ']'"},
      {"{'descr': '<f\\x34', 'fortran_order': False, 'shape': (3,), }",
       "malformed header field 'descr': escape sequences are not part of a .npy header"},
      {"{'descr': '<f4', 'fortran_order': None, 'shape': (3,), }",
       "malformed header field 'fortran_order': unknown name 'None'"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }",
       "header field 'shape': expected a tuple of non-negative integers"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (-3,), }",
       "header field 'shape': expected a tuple of non-negative integers, got (-3,)"},
      {"{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'descr\x01': 1}",
       "unexpected key 'descr\\x01'"},
  };
  for (const Case& c : cases) {
    const std::string msg = npy_error(p, npy_raw(c.header + "\n", data));
    EXPECT_CONTAINS(msg, c.expected);
  }
}

TEST_F(IoTest, NpyBadPreamble) {
  const fs::path p = path("P.npy");
  Bytes good = numpy_arange_3x4_f4();

  Bytes bad_magic = good;
  bad_magic[5] = 'X';
  EXPECT_CONTAINS(npy_error(p, bad_magic), "not a .npy file (bad magic string");
  EXPECT_CONTAINS(npy_error(p, Bytes{'h', 'e', 'l', 'l', 'o', ',', ' ', 'w', 'o', 'r', 'l', 'd'}),
                  "bad magic string");
  EXPECT_CONTAINS(npy_error(p, Bytes{}), "file is too short to be a .npy file (0 bytes)");
  EXPECT_CONTAINS(npy_error(p, Bytes{0x93, 'N', 'U', 'M'}), "too short");
  EXPECT_CONTAINS(npy_error(p, Bytes{0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 1, 0}), "too short");

  Bytes v4 = good;
  v4[6] = 4;
  EXPECT_CONTAINS(npy_error(p, v4), "unsupported .npy format version 4.0");
  Bytes v11 = good;
  v11[7] = 1;
  EXPECT_CONTAINS(npy_error(p, v11), "unsupported .npy format version 1.1");

  Bytes long_header = good;
  long_header[8] = 0xff;
  long_header[9] = 0xff;
  EXPECT_CONTAINS(npy_error(p, long_header),
                  "header is truncated: the header length field says 65535 bytes");
  // Version 2 with a 4 GiB header length in a tiny file: no 4 GiB allocation, a clear error.
  EXPECT_CONTAINS(
      npy_error(p, Bytes{0x93, 'N', 'U', 'M', 'P', 'Y', 2, 0, 0xff, 0xff, 0xff, 0xff, '{', '}'}),
      "header is truncated: the header length field says 4294967295 bytes");
}

TEST_F(IoTest, NpyMissingFileAndDirectory) {
  const fs::path missing = path("K.npy");
  EXPECT_EQ(error_of([&] { (void)levattn::read_npy(missing); }, ErrorKind::io),
            missing.string() + ": cannot open: No such file or directory");
  const std::string msg = error_of([&] { (void)levattn::read_npy(dir_); }, ErrorKind::io);
  EXPECT_STARTS_WITH(msg, dir_.string() + ": cannot open");
}

TEST_F(IoTest, NpyEveryTruncationAndRandomDamageFailCleanly) {
  const fs::path src = path("src.npy");
  levattn::write_npy(src, Array::from_float64({3, 2}, f64_values(6)));
  const Bytes good = read_bytes(src);
  const fs::path p = path("T.npy");
  for (std::size_t len = 0; len < good.size(); ++len) {
    write_bytes(p, Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len)));
    const std::string msg = error_of([&] { (void)levattn::read_npy(p); }, ErrorKind::io);
    EXPECT_STARTS_WITH(msg, p.string() + ": ");
  }
  // Random damage to the preamble and header: a clean Error(io) or a valid array, nothing else.
  std::mt19937 rng(12345);
  int failures = 0;
  for (int iter = 0; iter < 2000; ++iter) {
    Bytes b = good;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int k = 0; k < flips; ++k) {
      b[rng() % 128] = static_cast<std::uint8_t>(rng());
    }
    write_bytes(p, b);
    try {
      const Array a = levattn::read_npy(p);
      EXPECT_EQ(static_cast<std::size_t>(a.size()), a.f32.size() + a.f64.size() + a.i64.size());
    } catch (const Error& e) {
      ++failures;
      EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(ErrorKind::io)) << e.what();
    }
  }
  EXPECT_GT(failures, 100);  // the damage did reach the parser
}

// ---------------------------------------------------------------------------------------------
// Writing: validation and atomicity.

TEST_F(IoTest, WriteRejectsInvalidArrays) {
  const fs::path p = path("W.npy");
  Array zero_d = Array::from_float32({}, {1.0f});
  EXPECT_CONTAINS(error_of([&] { levattn::write_npy(p, zero_d); }, ErrorKind::invalid_argument),
                  "0-D");
  const Array five_d = Array::from_float32({1, 1, 1, 1, 2}, {1, 2});
  EXPECT_CONTAINS(error_of([&] { levattn::write_npy(p, five_d); }, ErrorKind::invalid_argument),
                  "5 dimensions");
  Array mismatch = Array::from_float32({2, 2}, {1, 2, 3, 4});
  mismatch.f32.pop_back();
  const std::string msg =
      error_of([&] { levattn::write_npy(p, mismatch); }, ErrorKind::invalid_argument);
  EXPECT_STARTS_WITH(msg, p.string() + ": ");
  EXPECT_CONTAINS(msg, "needs 4 float32 values, the array holds 3");
  Array mixed = Array::from_float32({2}, {1, 2});
  mixed.f64 = {1.0};
  error_of([&] { levattn::write_npy(p, mixed); }, ErrorKind::invalid_argument);
  EXPECT_TRUE(listing().empty());  // nothing was created
}

TEST_F(IoTest, WriteIntoMissingDirectoryLeavesNothing) {
  const fs::path p = path("nope") / "K.npy";
  const std::string msg = error_of(
      [&] {
        levattn::write_npy(p, Array::from_float32({2}, {1, 2}));
      },
      ErrorKind::io);
  EXPECT_STARTS_WITH(msg, p.string() + ": ");
  EXPECT_CONTAINS(msg, "No such file or directory");
  EXPECT_TRUE(listing().empty());
  EXPECT_FALSE(fs::exists(path("nope")));

  const fs::path z = path("nope") / "H.npz";
  EXPECT_STARTS_WITH(error_of(
                         [&] {
                           levattn::write_npz(z, {{"a", Array::from_int64({1}, {7})}});
                         },
                         ErrorKind::io),
                     z.string() + ": ");
  EXPECT_TRUE(listing().empty());
}

TEST_F(IoTest, FailedWriteKeepsExistingFile) {
  const fs::path p = path("K.npy");
  levattn::write_npy(p, Array::from_float32({3}, {1, 2, 3}));
  const Bytes before = read_bytes(p);

  // Fails before writing anything (invalid array).
  Array bad = Array::from_float32({3}, {4, 5, 6});
  bad.shape = {4};
  error_of([&] { levattn::write_npy(p, bad); }, ErrorKind::invalid_argument);
  EXPECT_EQ(read_bytes(p), before);

  // Fails at the rename: the target is a non-empty directory. The temporary file is removed and
  // the directory is intact.
  const fs::path d = path("sub");
  fs::create_directories(d);
  write_bytes(d / "inside", Bytes{1, 2, 3});
  const std::string msg =
      error_of([&] { levattn::write_npy(d, Array::from_float32({1}, {1})); }, ErrorKind::io);
  EXPECT_STARTS_WITH(msg, d.string() + ": ");
  EXPECT_EQ(read_bytes(d / "inside"), (Bytes{1, 2, 3}));
  EXPECT_EQ(listing(), (std::vector<std::string>{"K.npy", "sub"}));
  EXPECT_EQ(read_bytes(p), before);
}

TEST_F(IoTest, SuccessfulWriteReplacesFile) {
  const fs::path p = path("K.npy");
  levattn::write_npy(p, Array::from_float32({3}, {1, 2, 3}));
  levattn::write_npy(p, Array::from_int64({2, 2}, {9, 8, 7, 6}));
  const Array a = levattn::read_npy(p);
  EXPECT_EQ(a.shape, (std::vector<index_t>{2, 2}));
  EXPECT_EQ(a.i64, (std::vector<std::int64_t>{9, 8, 7, 6}));
  EXPECT_EQ(listing(), std::vector<std::string>{"K.npy"});

  const fs::path z = path("H.npz");
  levattn::write_npz(z, {{"a", Array::from_float32({1}, {1})}});
  levattn::write_npz(z, {{"b", Array::from_float32({2}, {2, 3})}});
  const auto arrays = levattn::read_npz(z);
  ASSERT_EQ(arrays.size(), 1u);
  EXPECT_EQ(arrays[0].first, "b");
  EXPECT_EQ(listing(), (std::vector<std::string>{"H.npz", "K.npy"}));
}

TEST_F(IoTest, ConcurrentWritersNeverLeaveAMixedFile) {
  // Four threads rewrite one path; a reader always sees one complete version.
  const fs::path p = path("C.npy");
  levattn::write_npy(p, Array::from_float32({4096}, std::vector<float>(4096, -1.0f)));
  std::atomic<bool> bad_read{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (int k = 0; k < 10; ++k) {
        levattn::write_npy(
            p, Array::from_float32({4096}, std::vector<float>(4096, static_cast<float>(t))));
        const Array a = levattn::read_npy(p);
        if (a.f32.size() != 4096 || std::count(a.f32.begin(), a.f32.end(), a.f32.front()) != 4096) {
          bad_read = true;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_FALSE(bad_read);
  EXPECT_EQ(listing(), std::vector<std::string>{"C.npy"});
}

// ---------------------------------------------------------------------------------------------
// to_float32.

TEST(IoToFloat32, ConvertsAndChecksRange) {
  EXPECT_EQ(levattn::to_float32(Array::from_float32({2}, {1.5f, -2.0f}), "K"),
            (std::vector<float>{1.5f, -2.0f}));
  const std::vector<float> f = levattn::to_float32(
      Array::from_float64({2, 2}, {0.1, -3.0e38, std::numeric_limits<double>::infinity(),
                                   std::numeric_limits<double>::quiet_NaN()}),
      "K");
  EXPECT_EQ(f[0], 0.1f);
  EXPECT_EQ(f[1], -3.0e38f);
  EXPECT_TRUE(std::isinf(f[2]));
  EXPECT_TRUE(std::isnan(f[3]));

  EXPECT_EQ(error_of(
                [] {
                  (void)levattn::to_float32(Array::from_float64({6}, {0, 1, 2, 3, 4, 1e300}), "Q");
                },
                ErrorKind::invalid_argument),
            "Q: value 1e+300 at flat index 5 is outside the float32 range");
  EXPECT_CONTAINS(
      error_of([] { (void)levattn::to_float32(Array::from_float64({1}, {-4e38}), "V"); },
               ErrorKind::invalid_argument),
      "V: value -4e+38 at flat index 0");
  EXPECT_EQ(error_of([] { (void)levattn::to_float32(Array::from_int64({1}, {1}), "idx"); },
                     ErrorKind::invalid_argument),
            "idx: expected a float32 or float64 array, got int64");
}

// ---------------------------------------------------------------------------------------------
// .npz.

TEST_F(IoTest, NpzRoundTrip) {
  const std::vector<std::pair<std::string, Array>> arrays = {
      {"value", Array::from_float32({2, 3}, f32_values(6))},
      {"key_2", Array::from_float64({2, 1, 2, 2}, f64_values(8))},
      {"idx", Array::from_int64({5}, i64_values(5))},
      {"empty", Array::from_float32({0, 4}, {})},
      {"q/sub", Array::from_float64({1, 2, 3}, f64_values(6))},
  };
  const fs::path p = path("H.npz");
  levattn::write_npz(p, arrays);
  const auto back = levattn::read_npz(p);
  ASSERT_EQ(back.size(), arrays.size());
  for (std::size_t i = 0; i < arrays.size(); ++i) {
    EXPECT_EQ(back[i].first, arrays[i].first);  // archive order kept
    expect_same(back[i].second, arrays[i].second);
  }

  levattn::write_npz(path("none.npz"), {});
  EXPECT_TRUE(levattn::read_npz(path("none.npz")).empty());
}

TEST_F(IoTest, WrittenNpzHasCorrectZipStructure) {
  // Independent of read_npz: the local header, the CRC-32 (zlib's), and the end record.
  const fs::path p = path("H.npz");
  std::vector<float> v(12);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  levattn::write_npz(p, {{"value", Array::from_float32({3, 4}, v)}});
  const Bytes z = read_bytes(p);
  const Bytes npy = numpy_arange_3x4_f4();
  ASSERT_EQ(z.size(), 30 + 9 + npy.size() + 46 + 9 + 22);
  auto le32 = [&](std::size_t o) {
    return static_cast<std::uint32_t>(z[o] | (z[o + 1] << 8) | (z[o + 2] << 16)) |
           (static_cast<std::uint32_t>(z[o + 3]) << 24);
  };
  EXPECT_EQ(le32(0), 0x04034b50u);
  EXPECT_EQ(z[8] | (z[9] << 8), 0);  // method: stored
  EXPECT_EQ(le32(14), crc_of(npy));  // CRC-32
  EXPECT_EQ(le32(18), npy.size());   // compressed size
  EXPECT_EQ(le32(22), npy.size());   // uncompressed size
  EXPECT_EQ(std::string(z.begin() + 30, z.begin() + 39), "value.npy");
  EXPECT_EQ(Bytes(z.begin() + 39, z.begin() + 39 + static_cast<std::ptrdiff_t>(npy.size())), npy);
  const std::size_t eocd = z.size() - 22;
  EXPECT_EQ(le32(eocd), 0x06054b50u);
  EXPECT_EQ(z[eocd + 10], 1);                       // one entry
  EXPECT_EQ(le32(eocd + 16), 30 + 9 + npy.size());  // central directory offset
}

TEST_F(IoTest, ReadsNpzAsNumpyWritesIt) {
  // np.savez('H.npz', value=np.arange(12, dtype='<f4').reshape(3, 4), idx=np.arange(3)):
  // stored members with a local ZIP64 extra field (numpy passes force_zip64=True).
  const fs::path p = path("H.npz");
  write_bytes(p, build_zip({stored_entry("value.npy", numpy_arange_3x4_f4()),
                            stored_entry("idx.npy", numpy_arange_3_i8())}));
  ASSERT_EQ(fs::file_size(p), 574u);  // the size numpy 1.24 produces
  const auto arrays = levattn::read_npz(p);
  ASSERT_EQ(arrays.size(), 2u);
  EXPECT_EQ(arrays[0].first, "value");
  EXPECT_EQ(arrays[0].second.shape, (std::vector<index_t>{3, 4}));
  EXPECT_EQ(arrays[0].second.f32[11], 11.0f);
  EXPECT_EQ(arrays[1].first, "idx");
  EXPECT_EQ(arrays[1].second.i64, (std::vector<std::int64_t>{0, 1, 2}));
}

TEST_F(IoTest, ReadsZip64CentralDirectoryAndEndRecord) {
  const fs::path p = path("Z.npz");
  ZipEntry a = stored_entry("value.npy", numpy_arange_3x4_f4());
  a.central_zip64 = true;
  ZipEntry b = stored_entry("idx.npy", numpy_arange_3_i8());
  b.central_zip64 = true;
  write_bytes(p, build_zip({a, b}, /*zip64_end=*/true));
  const auto arrays = levattn::read_npz(p);
  ASSERT_EQ(arrays.size(), 2u);
  EXPECT_EQ(arrays[0].second.f32[5], 5.0f);
  EXPECT_EQ(arrays[1].second.i64, (std::vector<std::int64_t>{0, 1, 2}));

  // 0xFFFFFFFF sizes without the ZIP64 extra: an error, not a 4 GiB read.
  ZipLayout lay;
  Bytes z = build_zip({stored_entry("value.npy", numpy_arange_3x4_f4())}, false, &lay);
  for (std::size_t k = 0; k < 4; ++k) z[lay.central[0] + 20 + k] = 0xff;
  write_bytes(p, z);
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  p.string() +
                      ": a central directory entry has sizes or offset 0xFFFFFFFF but no "
                      "ZIP64 extra field");
}

TEST_F(IoTest, ReadsDeflatedNpz) {
  // As np.savez_compressed writes: deflate (method 8) raw streams.
  std::vector<double> v(1000);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i % 7) * 0.25;
  const Bytes big =
      npy_file("{'descr': '<f8', 'fortran_order': False, 'shape': (10, 100), }", le_bytes(v));
  const ZipEntry value = deflated_entry("value.npy", big);
  ASSERT_LT(value.stored.size(), big.size() / 4);  // really compressed
  const fs::path p = path("C.npz");
  write_bytes(p, build_zip({value, deflated_entry("idx.npy", numpy_arange_3_i8())}));
  const auto arrays = levattn::read_npz(p);
  ASSERT_EQ(arrays.size(), 2u);
  EXPECT_EQ(arrays[0].first, "value");
  EXPECT_EQ(arrays[0].second.shape, (std::vector<index_t>{10, 100}));
  EXPECT_EQ(arrays[0].second.f64, v);
  EXPECT_EQ(arrays[1].second.i64, (std::vector<std::int64_t>{0, 1, 2}));

  // A damaged deflate stream, a cut one, and one whose declared size is wrong.
  ZipEntry damaged = value;
  for (std::size_t k = 0; k < 8 && k < damaged.stored.size(); ++k) damaged.stored[k] ^= 0x5a;
  write_bytes(p, build_zip({damaged}));
  EXPECT_STARTS_WITH(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                     p.string() + ": member 'value': ");
  ZipEntry cut = value;
  cut.stored.resize(cut.stored.size() / 2);
  write_bytes(p, build_zip({cut}));
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  "member 'value': deflate data is truncated");
  ZipEntry lying = value;
  lying.size = std::uint64_t{1} << 31;  // claims 2 GiB
  write_bytes(p, build_zip({lying}));
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  "member 'value': deflate data decodes to " + std::to_string(big.size()) +
                      " bytes, the archive says 2147483648");
  lying.size = big.size() - 1;
  write_bytes(p, build_zip({lying}));
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  "member 'value': deflate data decodes to more than");
}

/// Runs `script` with LEVATTN_PYTHON (numpy available), the test directory as sys.argv[1]; returns
/// the exit status. The script must not contain single quotes.
int run_python(const std::string& script, const fs::path& dir) {
  EXPECT_EQ(script.find('\''), std::string::npos);
  const std::string command =
      std::string(LEVATTN_PYTHON) + " -c '" + script + "' '" + dir.string() + "'";
  return std::system(command.c_str());
}

TEST_F(IoTest, ReadsNpzWrittenByNumpy) {
  // numpy's own np.savez_compressed (deflated members) and np.savez (stored members with a local
  // ZIP64 extra field), a non-ASCII name among them.
  ASSERT_EQ(run_python(R"(
import sys, numpy as np
d = sys.argv[1]
v = (np.arange(1000) % 7 * 0.25).reshape(10, 100)
k = np.arange(12, dtype="<f4").reshape(3, 4)
np.savez_compressed(d + "/C.npz", value=v, idx=np.arange(3), k=k,
                    **{"\u00e9t\u00e9": np.zeros((0, 2), dtype="<f4")})
np.savez(d + "/S.npz", value=v, idx=np.arange(3))
)",
                       dir_),
            0);
  std::vector<double> v(1000);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(i % 7) * 0.25;

  const Bytes c = read_bytes(path("C.npz"));
  ASSERT_GT(c.size(), 30u);
  EXPECT_EQ(c[8] | (c[9] << 8), 8);  // the first member is deflated
  const auto deflated = levattn::read_npz(path("C.npz"));
  ASSERT_EQ(deflated.size(), 4u);
  EXPECT_EQ(deflated[0].first, "value");
  EXPECT_EQ(deflated[0].second.shape, (std::vector<index_t>{10, 100}));
  EXPECT_EQ(deflated[0].second.f64, v);
  EXPECT_EQ(deflated[1].first, "idx");
  EXPECT_EQ(deflated[1].second.i64, (std::vector<std::int64_t>{0, 1, 2}));
  EXPECT_EQ(deflated[2].first, "k");
  EXPECT_EQ(deflated[2].second.shape, (std::vector<index_t>{3, 4}));
  EXPECT_EQ(deflated[2].second.f32[11], 11.0f);
  EXPECT_EQ(deflated[3].first, "\xc3\xa9t\xc3\xa9");
  EXPECT_EQ(deflated[3].second.shape, (std::vector<index_t>{0, 2}));

  const auto stored = levattn::read_npz(path("S.npz"));
  ASSERT_EQ(stored.size(), 2u);
  EXPECT_EQ(stored[0].first, "value");
  EXPECT_EQ(stored[0].second.f64, v);
  EXPECT_EQ(stored[1].second.i64, (std::vector<std::int64_t>{0, 1, 2}));
}

TEST_F(IoTest, NumpyReadsWrittenNpz) {
  levattn::write_npz(path("W.npz"),
                     {{"value", Array::from_float32({3, 4}, f32_values(12))},
                      {"idx", Array::from_int64({5}, i64_values(5))},
                      {"\xc3\xa9t\xc3\xa9", Array::from_float64({2, 1, 2, 2}, f64_values(8))},
                      {"empty", Array::from_float32({0, 4}, {})},
                      {"q/sub", Array::from_float64({1, 2, 3}, f64_values(6))}});
  // Exit status 0 only if numpy reads every array, with its name, dtype, shape and values.
  EXPECT_EQ(run_python(R"(
import sys, numpy as np
z = np.load(sys.argv[1] + "/W.npz")
f32 = lambda n: np.arange(n, dtype="<f4") * np.float32(0.5) - np.float32(3.25)
f64 = lambda n: np.arange(n) * 1e-3 - 1.0 / 3.0
want = {"value": f32(12).reshape(3, 4),
        "idx": np.arange(5, dtype="<i8") * 1000003 - (1 << 40),
        "\u00e9t\u00e9": f64(8).reshape(2, 1, 2, 2),
        "empty": np.zeros((0, 4), dtype="<f4"),
        "q/sub": f64(6).reshape(1, 2, 3)}
assert z.files == list(want), z.files
for name, w in want.items():
    a = z[name]
    assert a.dtype == w.dtype and a.shape == w.shape and np.array_equal(a, w), name
)",
                       dir_),
            0);
}

TEST_F(IoTest, NpzCorruptedCrc) {
  const fs::path p = path("H.npz");
  levattn::write_npz(p, {{"value", Array::from_float32({3, 4}, f32_values(12))}});
  Bytes z = read_bytes(p);
  z[30 + 9 + 128 + 5] ^= 0x01;  // a bit of the member's data (after both headers)
  write_bytes(p, z);
  const std::string msg = error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io);
  EXPECT_STARTS_WITH(msg, p.string() + ": member 'value': CRC-32 mismatch");
}

TEST_F(IoTest, NpzEveryTruncationFailsCleanly) {
  const fs::path src = path("src.npz");
  levattn::write_npz(src, {{"value", Array::from_float32({2, 2}, f32_values(4))},
                           {"idx", Array::from_int64({2}, {1, 2})}});
  const Bytes good = read_bytes(src);
  const fs::path p = path("H.npz");
  for (std::size_t len = 0; len < good.size(); ++len) {
    write_bytes(p, Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(len)));
    const std::string msg = error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io);
    EXPECT_STARTS_WITH(msg, p.string() + ": ");
  }
  write_bytes(p, Bytes(good.begin(), good.end() - 1));
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  "no end-of-central-directory record");

  // Random damage anywhere: a clean Error(io) or a valid result, nothing else.
  std::mt19937 rng(777);
  for (int iter = 0; iter < 2000; ++iter) {
    Bytes b = good;
    b[rng() % b.size()] = static_cast<std::uint8_t>(rng());
    if (iter % 2 == 0) b[rng() % b.size()] = static_cast<std::uint8_t>(rng());
    write_bytes(p, b);
    try {
      (void)levattn::read_npz(p);
    } catch (const Error& e) {
      EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(ErrorKind::io)) << e.what();
    }
  }
}

TEST_F(IoTest, NpzUnsupportedMethodAndEncryption) {
  const fs::path p = path("H.npz");
  ZipEntry bz = stored_entry("value.npy", numpy_arange_3x4_f4());
  bz.method = 12;
  write_bytes(p, build_zip({bz}));
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  "H.npz: member 'value': compression method 12 (bzip2) is not supported");

  ZipEntry enc = stored_entry("value.npy", numpy_arange_3x4_f4());
  enc.flags = 1;
  write_bytes(p, build_zip({enc}));
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  "member 'value': is encrypted");
}

TEST_F(IoTest, NpzStructuralErrors) {
  const fs::path p = path("H.npz");
  auto npz_error = [&](const Bytes& z) {
    write_bytes(p, z);
    const std::string msg = error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io);
    EXPECT_STARTS_WITH(msg, p.string() + ": ");
    return msg;
  };

  EXPECT_CONTAINS(npz_error(numpy_arange_3x4_f4()), "not a ZIP archive");
  EXPECT_CONTAINS(npz_error(build_zip({stored_entry("readme.txt", Bytes{'h', 'i'})})),
                  "member 'readme.txt' is not a .npy file");
  EXPECT_CONTAINS(npz_error(build_zip({stored_entry("a.npy", numpy_arange_3_i8()),
                                       stored_entry("a.npy", numpy_arange_3_i8())})),
                  "member 'a': appears twice");

  // A member whose .npy is bad (CRC correct): the .npy message, prefixed with the member.
  Bytes truncated_npy = numpy_arange_3x4_f4();
  truncated_npy.resize(truncated_npy.size() - 28);
  EXPECT_EQ(npz_error(build_zip({stored_entry("value.npy", truncated_npy)})),
            p.string() +
                ": member 'value': data is truncated: header shape (3, 4) of <f4 needs 48 bytes, "
                "file has 20");

  ZipLayout lay;
  const Bytes good = build_zip({stored_entry("value.npy", numpy_arange_3x4_f4()),
                                stored_entry("idx.npy", numpy_arange_3_i8())},
                               false, &lay);
  auto set32 = [](Bytes& b, std::size_t o, std::uint32_t v) {
    for (int k = 0; k < 4; ++k)
      b[o + static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(v >> (8 * k));
  };
  // Local headers that do not match the central directory. libzip's consistency check reports
  // them for the archive as a whole, not per member.
  const std::string local_mismatch =
      ": the members' local headers and data do not match the central directory";
  {  // local header offset past the end of the file
    Bytes z = good;
    set32(z, lay.central[1] + 42, 0x7fffffff);
    EXPECT_CONTAINS(npz_error(z), p.string() + local_mismatch);
  }
  {  // local header offset pointing at the other member's header, which names 'value'
    Bytes z = good;
    set32(z, lay.central[1] + 42, 0);
    EXPECT_CONTAINS(npz_error(z), p.string() + local_mismatch);
  }
  {  // compressed size past the end of the file (in the central directory only)
    Bytes z = good;
    set32(z, lay.central[0] + 20, 0x10000000);
    set32(z, lay.central[0] + 24, 0x10000000);
    EXPECT_CONTAINS(npz_error(z), p.string() + local_mismatch);
  }
  {  // bad local header signature
    Bytes z = good;
    z[lay.local[1]] = 'X';
    EXPECT_CONTAINS(npz_error(z), p.string() + local_mismatch);
  }

  // End records and central directories that do not fit the file or each other.
  const std::string directory_mismatch =
      ": the ZIP archive is inconsistent: the end-of-central-directory record and the central "
      "directory do not agree";
  {  // central directory offset beyond the file
    Bytes z = good;
    set32(z, lay.eocd + 16, 0x00ffffff);
    EXPECT_CONTAINS(npz_error(z), p.string() + directory_mismatch);
  }
  {  // entry count larger than the directory can hold
    Bytes z = good;
    z[lay.eocd + 8] = 0xff;
    z[lay.eocd + 10] = 0xff;
    EXPECT_CONTAINS(npz_error(z), p.string() + directory_mismatch);
  }
  {  // bad central directory signature: the end record leads to no valid directory
    Bytes z = good;
    z[lay.central[0]] = 'X';
    EXPECT_CONTAINS(npz_error(z),
                    p.string() +
                        ": not a ZIP archive: no end-of-central-directory record with a "
                        "valid central directory");
  }
  {  // stored member whose sizes disagree
    ZipEntry e = stored_entry("value.npy", numpy_arange_3x4_f4());
    e.size += 1;
    EXPECT_CONTAINS(npz_error(build_zip({e})), "member 'value': stored (uncompressed) member");
  }
}

TEST_F(IoTest, NpzOverlappingMembersAreRejected) {
  // A "quoted overlap", how zip bombs multiply their output: member a's data runs on over member
  // b's local header and data. Every header is consistent (sizes and CRC-32 in the local headers
  // and the central directory agree) and each member's data is intact, so only the overlap
  // itself is wrong.
  const Bytes npy = numpy_arange_3_i8();
  ZipEntry a = stored_entry("a.npy", npy);
  ZipEntry b = stored_entry("b.npy", npy);
  a.local_zip64 = b.local_zip64 = false;
  ZipLayout lay;
  Bytes z = build_zip({a, b}, false, &lay);
  const std::size_t longer = lay.central[0] - lay.data[0];  // up to the central directory
  const std::uint32_t crc =
      crc_of(Bytes(z.begin() + static_cast<std::ptrdiff_t>(lay.data[0]),
                   z.begin() + static_cast<std::ptrdiff_t>(lay.data[0] + longer)));
  auto set32 = [&](std::size_t o, std::uint32_t v) {
    for (std::size_t k = 0; k < 4; ++k) z[o + k] = static_cast<std::uint8_t>(v >> (8 * k));
  };
  for (const std::size_t header : {lay.local[0] + 14, lay.central[0] + 16}) {
    set32(header, crc);
    set32(header + 4, static_cast<std::uint32_t>(longer));
    set32(header + 8, static_cast<std::uint32_t>(longer));
  }
  const fs::path p = path("O.npz");
  write_bytes(p, z);
  EXPECT_STARTS_WITH(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                     p.string() + ": the members' headers and data need at least ");
  EXPECT_CONTAINS(error_of([&] { (void)levattn::read_npz(p); }, ErrorKind::io),
                  "bytes but the file has " + std::to_string(z.size()) + ": members overlap");
}

TEST_F(IoTest, WriteNpzRejectsBadNames) {
  const fs::path p = path("H.npz");
  const Array a = Array::from_float32({1}, {1});
  EXPECT_CONTAINS(error_of(
                      [&] {
                        levattn::write_npz(p, {{"", a}});
                      },
                      ErrorKind::invalid_argument),
                  "name is empty");
  EXPECT_CONTAINS(error_of(
                      [&] {
                        levattn::write_npz(p, {{"x", a}, {"x", a}});
                      },
                      ErrorKind::invalid_argument),
                  "'x' appears twice");
  Array bad = a;
  bad.shape = {2};
  EXPECT_CONTAINS(error_of(
                      [&] {
                        levattn::write_npz(p, {{"k", bad}});
                      },
                      ErrorKind::invalid_argument),
                  p.string() + ": array 'k': ");
  EXPECT_TRUE(listing().empty());
}

}  // namespace
