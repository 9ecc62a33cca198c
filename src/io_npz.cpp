// io_npz.cpp: .npz archives, the ZIP files that numpy.savez (stored members) and
// numpy.savez_compressed (deflated members) write, one NAME.npy member per array.
//
// Reading parses the ZIP structure from the end-of-central-directory record (ZIP64 records and
// extra fields included, which numpy writes for large arrays), checks every offset and size
// against the file, inflates deflated members with zlib, verifies each member's CRC-32 and size,
// and decodes the member with the .npy parser. Writing produces a stored archive, atomically.
#include <zlib.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstring>
#include <set>
#include <string_view>
#include <utility>

#include "detail/npy_format.hpp"

namespace levattn {
namespace {

using detail::append_le16;
using detail::append_le32;
using detail::append_le64;
using detail::load_le16;
using detail::load_le32;
using detail::load_le64;

// Record signatures and fixed sizes (PKWARE APPNOTE.TXT, sections 4.3 and 4.4).
constexpr std::uint32_t kLocalSig = 0x04034b50;
constexpr std::uint32_t kCentralSig = 0x02014b50;
constexpr std::uint32_t kEocdSig = 0x06054b50;
constexpr std::uint32_t kZip64EocdSig = 0x06064b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint64_t kLocalSize = 30;
constexpr std::uint64_t kCentralSize = 46;
constexpr std::uint64_t kEocdSize = 22;
constexpr std::uint64_t kZip64EocdSize = 56;
constexpr std::uint64_t kZip64LocatorSize = 20;
constexpr std::uint16_t kZip64ExtraId = 0x0001;
constexpr std::uint32_t kMax32 = 0xFFFFFFFF;  // a 32-bit field of this value is in the ZIP64 extra
constexpr std::uint16_t kMax16 = 0xFFFF;
constexpr std::uint16_t kFlagEncrypted = 0x0001;
constexpr std::uint16_t kFlagStrongEncryption = 0x0040;
constexpr std::uint16_t kFlagUtf8 = 0x0800;
constexpr std::uint16_t kMethodStored = 0;
constexpr std::uint16_t kMethodDeflate = 8;
constexpr std::uint16_t kDosDate1980 = (0 << 9) | (1 << 5) | 1;  // 1980-01-01, as numpy writes

[[noreturn]] void fail(const std::string& where, const std::string& what) {
  throw Error(ErrorKind::io, where + ": " + what);
}

/// Whether [offset, offset + len) lies within [0, limit), without overflow.
bool in_bounds(std::uint64_t offset, std::uint64_t len, std::uint64_t limit) {
  return offset <= limit && len <= limit - offset;
}

/// A member name for messages: ".npy" removed, non-printable bytes escaped, length capped.
std::string display_name(std::string_view name) {
  constexpr std::string_view kSuffix = ".npy";
  if (name.size() >= kSuffix.size() && name.substr(name.size() - kSuffix.size()) == kSuffix) {
    name.remove_suffix(kSuffix.size());
  }
  std::string out;
  for (const char ch : name) {
    const auto c = static_cast<unsigned char>(ch);
    if (out.size() >= 80) return out + "...";
    if (c >= 0x20 && c != 0x7f) {
      out += ch;  // UTF-8 names pass through
    } else {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

std::string hex32(std::uint32_t v) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s = "0x";
  for (int shift = 28; shift >= 0; shift -= 4) s += kHex[(v >> shift) & 15];
  return s;
}

/// zlib's crc32 continued over `data`, in chunks that fit its uInt lengths.
std::uint32_t crc32_update(std::uint32_t crc, std::span<const std::uint8_t> data) {
  uLong c = crc;
  while (!data.empty()) {
    const std::size_t n = std::min<std::size_t>(data.size(), std::size_t{1} << 30);
    c = ::crc32(c, data.data(), static_cast<uInt>(n));
    data = data.subspan(n);
  }
  return static_cast<std::uint32_t>(c);
}

std::string method_name(std::uint16_t method) {
  switch (method) {
    case 9:
      return " (deflate64)";
    case 12:
      return " (bzip2)";
    case 14:
      return " (LZMA)";
    case 93:
      return " (Zstandard)";
    case 95:
      return " (xz)";
    case 98:
      return " (PPMd)";
    case 99:
      return " (AES encryption)";
    default:
      return "";
  }
}

/// One member as the central directory describes it.
struct Member {
  std::string name;  // as stored, "value.npy"
  std::uint16_t flags = 0;
  std::uint16_t method = 0;
  std::uint32_t crc = 0;
  std::uint64_t compressed = 0;
  std::uint64_t uncompressed = 0;
  std::uint64_t local_offset = 0;
  std::uint64_t data_offset = 0;  // after the local header, filled by locate_data
};

/// Where the central directory is, from the end records.
struct Directory {
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  std::uint64_t entries = 0;
  std::uint64_t end_records = 0;  // offset of the first end record (ZIP64 or classic)
};

Directory find_directory(std::span<const std::uint8_t> bytes, const std::string& where) {
  const std::uint64_t size = bytes.size();
  const std::string not_zip =
      "not a ZIP archive: no end-of-central-directory record (not a .npz file, or truncated)";
  if (size < kEocdSize) fail(where, not_zip);
  // The record is the last thing in the file, followed only by its comment (at most 64 KiB).
  const std::uint64_t lowest = size - kEocdSize > kMax16 ? size - kEocdSize - kMax16 : 0;
  std::uint64_t eocd = size - kEocdSize;
  for (;; --eocd) {
    const std::uint8_t* p = bytes.data() + eocd;
    if (load_le32(p) == kEocdSig && eocd + kEocdSize + load_le16(p + 20) == size) break;
    if (eocd == lowest) fail(where, not_zip);
  }
  const std::uint8_t* e = bytes.data() + eocd;
  std::uint64_t disk = load_le16(e + 4);
  std::uint64_t cd_disk = load_le16(e + 6);
  std::uint64_t entries_here = load_le16(e + 8);
  Directory dir;
  dir.entries = load_le16(e + 10);
  dir.size = load_le32(e + 12);
  dir.offset = load_le32(e + 16);
  dir.end_records = eocd;

  // A ZIP64 locator just before the record points to the ZIP64 end record, whose 64-bit fields
  // replace the classic ones (which then hold 0xFFFF / 0xFFFFFFFF).
  if (eocd >= kZip64LocatorSize && load_le32(e - kZip64LocatorSize) == kZip64LocatorSig) {
    const std::uint8_t* loc = e - kZip64LocatorSize;
    const std::uint64_t z64 = load_le64(loc + 8);
    const std::uint32_t disks = load_le32(loc + 16);
    if (!in_bounds(z64, kZip64EocdSize, eocd - kZip64LocatorSize) ||
        load_le32(bytes.data() + z64) != kZip64EocdSig) {
      fail(where, "the ZIP64 end-of-central-directory record is missing or out of bounds");
    }
    if (disks > 1) fail(where, "multi-volume ZIP archives are not supported");
    const std::uint8_t* z = bytes.data() + z64;
    disk = load_le32(z + 16);
    cd_disk = load_le32(z + 20);
    entries_here = load_le64(z + 24);
    dir.entries = load_le64(z + 32);
    dir.size = load_le64(z + 40);
    dir.offset = load_le64(z + 48);
    dir.end_records = z64;
  }
  if (disk != 0 || cd_disk != 0 || entries_here != dir.entries) {
    fail(where, "multi-volume ZIP archives are not supported");
  }
  if (!in_bounds(dir.offset, dir.size, dir.end_records)) {
    fail(where, "the central directory (offset " + std::to_string(dir.offset) + ", " +
                    std::to_string(dir.size) + " bytes) lies outside the file (" +
                    std::to_string(size) + " bytes): the archive is truncated or corrupted");
  }
  if (dir.entries > dir.size / kCentralSize) {
    fail(where, "the central directory (" + std::to_string(dir.size) + " bytes) is too small for " +
                    std::to_string(dir.entries) + " entries");
  }
  return dir;
}

/// Replaces the 32-bit sizes and offset that are 0xFFFFFFFF by the values of the ZIP64 extra
/// field, which holds, in this order, exactly those that overflowed.
void apply_zip64_extra(Member& m, std::span<const std::uint8_t> extra, bool unc_in_extra,
                       bool comp_in_extra, bool offset_in_extra, const std::string& where) {
  std::size_t q = 0;
  while (q + 4 <= extra.size()) {
    const std::uint16_t id = load_le16(extra.data() + q);
    const std::uint16_t len = load_le16(extra.data() + q + 2);
    if (q + 4 + len > extra.size()) fail(where, "extra field is truncated");
    if (id == kZip64ExtraId) {
      std::span<const std::uint8_t> field = extra.subspan(q + 4, len);
      auto take = [&](std::uint64_t& out) {
        if (field.size() < 8) fail(where, "ZIP64 extra field is too short");
        out = load_le64(field.data());
        field = field.subspan(8);
      };
      if (unc_in_extra) take(m.uncompressed);
      if (comp_in_extra) take(m.compressed);
      if (offset_in_extra) take(m.local_offset);
      return;
    }
    q += 4 + std::size_t{len};
  }
  fail(where, "sizes or offset are 0xFFFFFFFF but there is no ZIP64 extra field");
}

std::vector<Member> read_central_directory(std::span<const std::uint8_t> bytes,
                                           const Directory& dir, const std::string& where) {
  std::vector<Member> members;
  members.reserve(static_cast<std::size_t>(dir.entries));  // bounded by size / 46 above
  const std::uint64_t end = dir.offset + dir.size;
  std::uint64_t p = dir.offset;
  for (std::uint64_t i = 0; i < dir.entries; ++i) {
    const std::string entry = "central directory entry " + std::to_string(i);
    if (!in_bounds(p, kCentralSize, end)) fail(where, entry + " is truncated");
    const std::uint8_t* c = bytes.data() + p;
    if (load_le32(c) != kCentralSig) fail(where, entry + " has a bad signature");
    Member m;
    m.flags = load_le16(c + 8);
    m.method = load_le16(c + 10);
    m.crc = load_le32(c + 16);
    const std::uint32_t comp32 = load_le32(c + 20);
    const std::uint32_t unc32 = load_le32(c + 24);
    const std::uint16_t name_len = load_le16(c + 28);
    const std::uint16_t extra_len = load_le16(c + 30);
    const std::uint16_t comment_len = load_le16(c + 32);
    const std::uint32_t local32 = load_le32(c + 42);
    const std::uint64_t var_len = std::uint64_t{name_len} + extra_len + comment_len;
    if (!in_bounds(p + kCentralSize, var_len, end)) fail(where, entry + " is truncated");
    m.name.assign(reinterpret_cast<const char*>(c + kCentralSize), name_len);
    m.compressed = comp32;
    m.uncompressed = unc32;
    m.local_offset = local32;
    if (comp32 == kMax32 || unc32 == kMax32 || local32 == kMax32) {
      apply_zip64_extra(m, bytes.subspan(p + kCentralSize + name_len, extra_len), unc32 == kMax32,
                        comp32 == kMax32, local32 == kMax32,
                        where + ": member '" + display_name(m.name) + "'");
    }
    members.push_back(std::move(m));
    p += kCentralSize + var_len;
  }
  return members;
}

/// Reads the local header of `m` and sets m.data_offset; checks the data lies in the file.
void locate_data(std::span<const std::uint8_t> bytes, Member& m, const std::string& mwhere) {
  const std::uint64_t size = bytes.size();
  if (!in_bounds(m.local_offset, kLocalSize, size)) {
    fail(mwhere, "local header offset " + std::to_string(m.local_offset) +
                     " lies outside the file (" + std::to_string(size) + " bytes)");
  }
  const std::uint8_t* l = bytes.data() + m.local_offset;
  if (load_le32(l) != kLocalSig) {
    fail(mwhere, "bad local header signature at offset " + std::to_string(m.local_offset));
  }
  const std::uint16_t name_len = load_le16(l + 26);
  const std::uint16_t extra_len = load_le16(l + 28);
  if (!in_bounds(m.local_offset + kLocalSize, std::uint64_t{name_len} + extra_len, size)) {
    fail(mwhere, "local header is truncated");
  }
  // As Python's zipfile does: a name that differs means the directory points at the wrong place.
  const std::string_view local_name(reinterpret_cast<const char*>(l + kLocalSize), name_len);
  if (local_name != m.name) {
    fail(mwhere, "the local header names '" + display_name(local_name) +
                     "', the central directory '" + display_name(m.name) + "'");
  }
  m.data_offset = m.local_offset + kLocalSize + name_len + extra_len;
  if (!in_bounds(m.data_offset, m.compressed, size)) {
    fail(mwhere, "data is truncated: the archive says " + std::to_string(m.compressed) +
                     " bytes at offset " + std::to_string(m.data_offset) + ", the file has " +
                     std::to_string(size - std::min(size, m.data_offset)));
  }
}

/// Inflates a raw deflate stream that must decode to exactly `expected` bytes and end exactly at
/// the end of `in`. The output grows with what the stream really produces, so a lying size in the
/// directory cannot make it allocate more than the data decodes to (plus one probe byte).
std::vector<std::uint8_t> inflate_raw(std::span<const std::uint8_t> in, std::uint64_t expected,
                                      const std::string& mwhere) {
  z_stream zs{};
  if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) {
    throw Error(ErrorKind::internal, mwhere + ": zlib inflateInit2 failed");
  }
  struct End {
    z_stream* zs;
    ~End() { inflateEnd(zs); }
  } end{&zs};

  // One byte more than expected, so that a stream that decodes to more is caught.
  const std::uint64_t limit = expected + 1;
  std::vector<std::uint8_t> out;
  out.resize(static_cast<std::size_t>(std::min<std::uint64_t>(
      limit, std::max<std::uint64_t>(std::uint64_t{1} << 16, std::uint64_t{4} * in.size()))));
  std::size_t consumed = 0;
  std::size_t produced = 0;
  for (;;) {
    if (produced == out.size()) {
      if (out.size() >= limit) break;  // decoded more than expected
      out.resize(
          static_cast<std::size_t>(std::min<std::uint64_t>(limit, 2 * std::uint64_t{out.size()})));
    }
    const auto in_chunk = static_cast<uInt>(std::min<std::size_t>(in.size() - consumed, UINT_MAX));
    const auto out_chunk =
        static_cast<uInt>(std::min<std::size_t>(out.size() - produced, UINT_MAX));
    // zlib does not write through next_in; the cast only removes const.
    zs.next_in = const_cast<Bytef*>(in.data() + consumed);
    zs.avail_in = in_chunk;
    zs.next_out = out.data() + produced;
    zs.avail_out = out_chunk;
    const int rc = inflate(&zs, Z_NO_FLUSH);
    consumed += in_chunk - zs.avail_in;
    produced += out_chunk - zs.avail_out;
    if (rc == Z_STREAM_END) break;
    if (rc == Z_OK) continue;
    if (rc == Z_BUF_ERROR && consumed < in.size()) continue;  // needed more output space
    if (rc == Z_BUF_ERROR) fail(mwhere, "deflate data is truncated");
    fail(mwhere, std::string("corrupt deflate data (zlib: ") + (zs.msg ? zs.msg : "error") + ")");
  }
  if (produced > expected) {
    fail(mwhere, "deflate data decodes to more than the " + std::to_string(expected) +
                     " bytes the archive says");
  }
  if (produced < expected) {
    fail(mwhere, "deflate data decodes to " + std::to_string(produced) +
                     " bytes, the archive says " + std::to_string(expected));
  }
  if (consumed != in.size()) {
    fail(mwhere, "deflate data ends " + std::to_string(in.size() - consumed) +
                     " bytes before the member does");
  }
  out.resize(produced);
  return out;
}

}  // namespace

std::vector<std::pair<std::string, Array>> read_npz(const std::filesystem::path& path) {
  const std::string where = path.string();
  const std::vector<std::uint8_t> file = detail::read_file(path, where);
  const std::span<const std::uint8_t> bytes(file);

  const Directory dir = find_directory(bytes, where);
  std::vector<Member> members = read_central_directory(bytes, dir, where);

  // Check names, flags and placement of every member before decoding any.
  std::set<std::string_view> names;
  for (Member& m : members) {
    const std::string mwhere = where + ": member '" + display_name(m.name) + "'";
    if (m.name.size() < 4 || m.name.compare(m.name.size() - 4, 4, ".npy") != 0) {
      fail(where, "member '" + display_name(m.name) +
                      "' is not a .npy file (an .npz archive holds only NAME.npy members)");
    }
    if (!names.insert(m.name).second) fail(mwhere, "appears twice in the archive");
    if (m.flags & (kFlagEncrypted | kFlagStrongEncryption)) {
      fail(mwhere, "is encrypted; encrypted archives are not supported");
    }
    locate_data(bytes, m, mwhere);
    if (m.data_offset + m.compressed > dir.offset) {
      fail(mwhere, "data overlaps the central directory");
    }
  }
  // Members must not share bytes: overlapping entries are how "zip bombs" multiply their output.
  std::vector<const Member*> by_offset;
  for (const Member& m : members) by_offset.push_back(&m);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const Member* a, const Member* b) { return a->local_offset < b->local_offset; });
  for (std::size_t i = 1; i < by_offset.size(); ++i) {
    const Member& a = *by_offset[i - 1];
    const Member& b = *by_offset[i];
    if (a.data_offset + a.compressed > b.local_offset) {
      fail(where, "members '" + display_name(a.name) + "' and '" + display_name(b.name) +
                      "' overlap (the archive is corrupted)");
    }
  }

  std::vector<std::pair<std::string, Array>> result;
  result.reserve(members.size());
  for (const Member& m : members) {
    const std::string mwhere = where + ": member '" + display_name(m.name) + "'";
    const std::span<const std::uint8_t> stored = bytes.subspan(
        static_cast<std::size_t>(m.data_offset), static_cast<std::size_t>(m.compressed));
    std::vector<std::uint8_t> inflated;
    std::span<const std::uint8_t> data;
    if (m.method == kMethodStored) {
      if (m.compressed != m.uncompressed) {
        fail(mwhere, "stored (uncompressed) member has compressed size " +
                         std::to_string(m.compressed) + " but size " +
                         std::to_string(m.uncompressed));
      }
      data = stored;
    } else if (m.method == kMethodDeflate) {
      inflated = inflate_raw(stored, m.uncompressed, mwhere);
      data = inflated;
    } else {
      fail(mwhere, "compression method " + std::to_string(m.method) + method_name(m.method) +
                       " is not supported (only 0, stored, and 8, deflate)");
    }
    const std::uint32_t crc = crc32_update(0, data);
    if (crc != m.crc) {
      fail(mwhere, "CRC-32 mismatch: the archive says " + hex32(m.crc) + ", the data has " +
                       hex32(crc) + " (the file is corrupted)");
    }
    std::string name = m.name.substr(0, m.name.size() - 4);
    result.emplace_back(std::move(name), detail::parse_npy(data, mwhere));
  }
  return result;
}

void write_npz(const std::filesystem::path& path,
               const std::vector<std::pair<std::string, Array>>& arrays) {
  const std::string where = path.string();
  std::set<std::string_view> seen;
  for (const auto& [name, array] : arrays) {
    if (name.empty()) {
      throw Error(ErrorKind::invalid_argument, where + ": an array name is empty");
    }
    if (name.find('\0') != std::string::npos || name.size() > kMax16 - 4) {
      throw Error(ErrorKind::invalid_argument,
                  where + ": array name '" + display_name(name) +
                      "' contains a NUL byte or is longer than 65531 bytes");
    }
    if (!seen.insert(name).second) {
      throw Error(ErrorKind::invalid_argument,
                  where + ": array name '" + display_name(name) + "' appears twice");
    }
    detail::check_writable(array, where + ": array '" + display_name(name) + "'");
  }

  // Owned bytes first (vectors of vectors: the spans below point into them), then the list of
  // pieces in file order: per member its local header, .npy header and values; then the central
  // directory and the end records.
  const std::size_t n = arrays.size();
  std::vector<std::vector<std::uint8_t>> locals(n);
  std::vector<std::vector<std::uint8_t>> npy_headers(n);
  std::vector<std::uint8_t> central;
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const std::string name = arrays[i].first + ".npy";
    const Array& array = arrays[i].second;
    npy_headers[i] = detail::npy_header_bytes(array);
    const std::span<const std::uint8_t> values = detail::value_bytes(array);
    const std::uint64_t size = npy_headers[i].size() + std::uint64_t{values.size()};
    const std::uint32_t crc = crc32_update(crc32_update(0, npy_headers[i]), values);
    const bool size64 = size >= kMax32;
    const bool offset64 = offset >= kMax32;
    const auto size32 = static_cast<std::uint32_t>(size64 ? kMax32 : size);
    const auto offset32 = static_cast<std::uint32_t>(offset64 ? kMax32 : offset);
    const std::uint16_t version = (size64 || offset64) ? 45 : 20;  // 4.5 for ZIP64
    const bool utf8 = std::any_of(name.begin(), name.end(),
                                  [](char c) { return static_cast<unsigned char>(c) >= 0x80; });
    const std::uint16_t flags = utf8 ? kFlagUtf8 : 0;

    // Local header; a local ZIP64 extra must carry both sizes.
    std::vector<std::uint8_t>& l = locals[i];
    append_le32(l, kLocalSig);
    append_le16(l, version);
    append_le16(l, flags);
    append_le16(l, kMethodStored);
    append_le16(l, 0);  // time 00:00
    append_le16(l, kDosDate1980);
    append_le32(l, crc);
    append_le32(l, size32);  // compressed
    append_le32(l, size32);  // uncompressed
    append_le16(l, static_cast<std::uint16_t>(name.size()));
    append_le16(l, size64 ? 20 : 0);
    l.insert(l.end(), name.begin(), name.end());
    if (size64) {
      append_le16(l, kZip64ExtraId);
      append_le16(l, 16);
      append_le64(l, size);
      append_le64(l, size);
    }

    // Central directory entry; its ZIP64 extra holds only the fields that overflowed.
    const std::uint16_t extra_len =
        static_cast<std::uint16_t>((size64 ? 16 : 0) + (offset64 ? 8 : 0));
    append_le32(central, kCentralSig);
    append_le16(central, static_cast<std::uint16_t>((3 << 8) | version));  // made by: Unix
    append_le16(central, version);
    append_le16(central, flags);
    append_le16(central, kMethodStored);
    append_le16(central, 0);
    append_le16(central, kDosDate1980);
    append_le32(central, crc);
    append_le32(central, size32);
    append_le32(central, size32);
    append_le16(central, static_cast<std::uint16_t>(name.size()));
    append_le16(central, static_cast<std::uint16_t>(extra_len == 0 ? 0 : extra_len + 4));
    append_le16(central, 0);               // comment length
    append_le16(central, 0);               // disk number
    append_le16(central, 0);               // internal attributes
    append_le32(central, 0100644u << 16);  // external attributes: regular file, rw-r--r--
    append_le32(central, offset32);
    central.insert(central.end(), name.begin(), name.end());
    if (extra_len != 0) {
      append_le16(central, kZip64ExtraId);
      append_le16(central, extra_len);
      if (size64) {
        append_le64(central, size);
        append_le64(central, size);
      }
      if (offset64) append_le64(central, offset);
    }
    offset += l.size() + size;
  }

  // End records: a ZIP64 record and locator when a classic field would overflow.
  const std::uint64_t cd_offset = offset;
  const std::uint64_t cd_size = central.size();
  std::vector<std::uint8_t> tail;
  if (n >= kMax16 || cd_size >= kMax32 || cd_offset >= kMax32) {
    const std::uint64_t z64 = cd_offset + cd_size;
    append_le32(tail, kZip64EocdSig);
    append_le64(tail, kZip64EocdSize - 12);  // size of the rest of the record
    append_le16(tail, (3 << 8) | 45);
    append_le16(tail, 45);
    append_le32(tail, 0);  // this disk
    append_le32(tail, 0);  // disk of the central directory
    append_le64(tail, n);
    append_le64(tail, n);
    append_le64(tail, cd_size);
    append_le64(tail, cd_offset);
    append_le32(tail, kZip64LocatorSig);
    append_le32(tail, 0);
    append_le64(tail, z64);
    append_le32(tail, 1);  // total number of disks
  }
  append_le32(tail, kEocdSig);
  append_le16(tail, 0);
  append_le16(tail, 0);
  append_le16(tail, static_cast<std::uint16_t>(std::min<std::uint64_t>(n, kMax16)));
  append_le16(tail, static_cast<std::uint16_t>(std::min<std::uint64_t>(n, kMax16)));
  append_le32(tail, static_cast<std::uint32_t>(std::min<std::uint64_t>(cd_size, kMax32)));
  append_le32(tail, static_cast<std::uint32_t>(std::min<std::uint64_t>(cd_offset, kMax32)));
  append_le16(tail, 0);  // comment length

  std::vector<std::span<const std::uint8_t>> pieces;
  pieces.reserve(3 * n + 2);
  for (std::size_t i = 0; i < n; ++i) {
    pieces.emplace_back(locals[i]);
    pieces.emplace_back(npy_headers[i]);
    pieces.push_back(detail::value_bytes(arrays[i].second));
  }
  pieces.emplace_back(central);
  pieces.emplace_back(tail);
  detail::write_file_atomically(path, pieces);
}

}  // namespace levattn
