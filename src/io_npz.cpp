// io_npz.cpp: .npz archives, the ZIP files that numpy.savez (stored members) and
// numpy.savez_compressed (deflated members) write, one NAME.npy member per array.
//
// libzip reads and writes the ZIP structure (ZIP64 records and extra fields included). Reading
// opens the archive twice from the file's bytes: first its directory alone, to check the members'
// names, methods and sizes with messages that name the member; then with libzip's consistency
// checks (every local header in place and agreeing with the central directory). Archives whose
// members could only fit the file by sharing bytes are rejected; then each member is read (libzip
// inflates deflated data and verifies the CRC-32 and the size) and decoded by the .npy parser.
// Writing builds a stored archive in memory and writes it atomically.
#include <zip.h>

#include <algorithm>
#include <array>
#include <limits>
#include <memory>
#include <set>
#include <string_view>
#include <utility>

#include "detail/require.hpp"
#include "npy_format.hpp"

namespace levattn {
namespace {

// Fixed sizes of the ZIP records (PKWARE APPNOTE.TXT, sections 4.3 and 4.4).
constexpr std::uint64_t kLocalSize = 30;
constexpr std::uint64_t kCentralSize = 46;
constexpr std::uint64_t kEocdSize = 22;
constexpr std::uint16_t kMax16 = 0xFFFF;
constexpr std::uint16_t kDosDate1980 = (0 << 9) | (1 << 5) | 1;  // 1980-01-01, as numpy writes

/// A member name for messages: ".npy" removed, non-printable bytes escaped, length capped.
std::string display_name(std::string_view name) {
  constexpr std::string_view kSuffix = ".npy";
  if (name.size() >= kSuffix.size() && name.substr(name.size() - kSuffix.size()) == kSuffix) {
    name.remove_suffix(kSuffix.size());
  }
  return detail::printable(name);
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

// ---------------------------------------------------------------------------------------------
// libzip handles.

/// A zip_error_t that is finalised on scope exit.
struct ZipError {
  zip_error_t error;
  ZipError() { zip_error_init(&error); }
  ~ZipError() { zip_error_fini(&error); }
  ZipError(const ZipError&) = delete;
  ZipError& operator=(const ZipError&) = delete;
  int code() const { return zip_error_code_zip(&error); }
};

/// libzip's text for an error ("Zip archive inconsistent", "CRC error", ...).
std::string libzip_message(zip_error_t* error) { return zip_error_strerror(error); }

struct DiscardArchive {
  void operator()(zip_t* za) const { zip_discard(za); }
};
struct CloseFile {
  void operator()(zip_file_t* zf) const { zip_fclose(zf); }
};
struct FreeSource {
  void operator()(zip_source_t* src) const { zip_source_free(src); }
};
using Archive = std::unique_ptr<zip_t, DiscardArchive>;
using File = std::unique_ptr<zip_file_t, CloseFile>;
using Source = std::unique_ptr<zip_source_t, FreeSource>;

// ---------------------------------------------------------------------------------------------
// Reading.

/// Opens `file` (which must outlive the archive) with libzip; null with `err` set on failure.
Archive open_archive(std::span<const std::uint8_t> file, int flags, ZipError& err) {
  Source src(zip_source_buffer_create(file.data(), file.size(), 0, &err.error));
  if (!src) return nullptr;
  Archive za(zip_open_from_source(src.get(), flags, &err.error));
  if (za) (void)src.release();  // the archive owns it now
  return za;
}

/// `what`, then libzip's own words for the error.
std::string with_libzip(const std::string& what, zip_error_t* error) {
  return what + " (libzip: " + libzip_message(error) + ")";
}

/// What an error of opening the archive says, for "<file>: <this>". The first opening reads the
/// end records and the central directory only.
std::string directory_error(ZipError& e) {
  switch (e.code()) {
    case ZIP_ER_NOZIP:
      return with_libzip(
          "not a ZIP archive: no end-of-central-directory record with a valid central "
          "directory (not a .npz file, or truncated or corrupted)",
          &e.error);
    case ZIP_ER_INCONS:
      return with_libzip(
          "the ZIP archive is inconsistent: the end-of-central-directory record and the central "
          "directory do not agree with each other or with the file size (truncated or "
          "corrupted)",
          &e.error);
    case ZIP_ER_NOENT:
      // The one extra field libzip must find in a directory entry is the ZIP64 one.
      return with_libzip(
          "a central directory entry has sizes or offset 0xFFFFFFFF but no ZIP64 extra field "
          "(the archive is corrupted)",
          &e.error);
    case ZIP_ER_MULTIDISK:
      return "multi-volume ZIP archives are not supported";
    case ZIP_ER_MEMORY:
      return "out of memory reading the ZIP directory";
    default:
      return with_libzip("cannot read the ZIP archive", &e.error);
  }
}

/// The same for the second opening, with libzip's consistency checks: every member's local header
/// must be in place and agree with its central directory entry (name, method, sizes, CRC-32), and
/// the data must end before the central directory.
std::string consistency_error(ZipError& e) {
  switch (e.code()) {
    case ZIP_ER_NOZIP:
    case ZIP_ER_INCONS:
      return with_libzip(
          "the members' local headers and data do not match the central directory: a header "
          "is missing, out of place or different, or the data runs past the central directory "
          "(the file is truncated or corrupted)",
          &e.error);
    case ZIP_ER_MEMORY:
      return "out of memory reading the ZIP directory";
    default:
      return with_libzip("cannot read the ZIP archive", &e.error);
  }
}

/// One member as the central directory describes it.
struct Member {
  std::string name;  // as stored, "value.npy"
  zip_uint64_t index = 0;
  std::uint16_t method = 0;
  std::uint64_t compressed = 0;
  std::uint64_t size = 0;
};

Member stat_member(zip_t* za, zip_uint64_t index, const std::string& where) {
  zip_stat_t st;
  zip_stat_init(&st);
  if (zip_stat_index(za, index, ZIP_FL_ENC_RAW, &st) != 0)
    detail::fail(ErrorKind::io, where, "central directory entry ", index, ": ", libzip_message(zip_get_error(za)));
  constexpr zip_uint64_t kNeeded =
      ZIP_STAT_NAME | ZIP_STAT_SIZE | ZIP_STAT_COMP_SIZE | ZIP_STAT_COMP_METHOD;
  LEVATTN_REQUIRE_FILE((st.valid & kNeeded) == kNeeded, where, "central directory entry ", index,
                       " lacks its name or sizes");
  Member m;
  m.name = st.name;
  m.index = index;
  m.method = st.comp_method;
  m.compressed = st.comp_size;
  m.size = st.size;
  const std::string mwhere = where + ": member '" + display_name(m.name) + "'";
  LEVATTN_REQUIRE_FILE(!((st.valid & ZIP_STAT_ENCRYPTION_METHOD) && st.encryption_method != ZIP_EM_NONE), mwhere,
                       "is encrypted; encrypted archives are not supported");
  LEVATTN_REQUIRE_FILE(m.method == ZIP_CM_STORE || m.method == ZIP_CM_DEFLATE, mwhere, "compression method ",
                       m.method, method_name(m.method), " is not supported (only 0, stored, and 8, deflate)");
  LEVATTN_REQUIRE_FILE(m.method != ZIP_CM_STORE || m.compressed == m.size, mwhere,
                       "stored (uncompressed) member has compressed size ", m.compressed, " but size ", m.size);
  return m;
}

/// Members must not share bytes: overlapping entries are how "zip bombs" multiply their output.
/// libzip does not say where a member lies, but each one takes at least its local header (30 bytes
/// and the name) and its data, its central directory entry at least 46 bytes and the name, and
/// the end record 22 bytes. Members that need more than the file has overlap; they are rejected
/// before anything is decompressed, which bounds the work by the file size.
void check_no_overlap(const std::vector<Member>& members, std::uint64_t file_size,
                      const std::string& where) {
  std::uint64_t need = kEocdSize;
  constexpr std::uint64_t kMax = std::numeric_limits<std::uint64_t>::max();
  for (const Member& m : members) {
    const std::uint64_t headers = kLocalSize + kCentralSize + 2 * std::uint64_t{m.name.size()};
    need = (m.compressed > kMax - need - headers) ? kMax : need + headers + m.compressed;
  }
  LEVATTN_REQUIRE_FILE(need <= file_size, where, "the members' headers and data need at least ",
                       need == kMax ? std::string("2^64") : std::to_string(need), " bytes but the file has ",
                       file_size, ": members overlap (the archive is corrupted)");
}

/// What an error of reading a member says, for "<file>: member '<name>': <this>". `produced` is
/// how many bytes the data had decoded to when the error came.
std::string member_error(zip_error_t* error, const Member& m, std::uint64_t produced) {
  const bool deflated = m.method == ZIP_CM_DEFLATE;
  switch (zip_error_code_zip(error)) {
    case ZIP_ER_CRC:
      // libzip ends a cut deflate stream quietly; the checksum then fails on the shorter data.
      if (produced < m.size) {
        return std::string(deflated ? "deflate data" : "data") +
               " is truncated or corrupted: it decodes to " + std::to_string(produced) +
               " of the " + std::to_string(m.size) + " bytes the archive says (CRC-32 mismatch)";
      }
      return "CRC-32 mismatch: the data does not have the checksum the archive records (the file "
             "is corrupted)";
    case ZIP_ER_INCONS:
      // At the end of the data: the size differs from the one in the directory.
      return with_libzip(std::string(deflated ? "deflate data" : "data") + " decodes to " +
                             std::to_string(produced) + " bytes, the archive says " +
                             std::to_string(m.size),
                         error);
    case ZIP_ER_EOF:
      return with_libzip(std::string(deflated ? "deflate data" : "data") + " is truncated", error);
    case ZIP_ER_ZLIB:
    case ZIP_ER_COMPRESSED_DATA:
      return with_libzip("corrupt deflate data", error);
    case ZIP_ER_MEMORY:
      return "out of memory decompressing the member";
    default:
      return with_libzip("cannot read the member", error);
  }
}

/// The bytes of a member. The buffer grows with what the data really decodes to, so that a lying
/// size in the directory cannot make it allocate more than that (plus one probe byte).
std::vector<std::uint8_t> read_member(zip_t* za, const Member& m, const std::string& mwhere) {
  const File zf(zip_fopen_index(za, m.index, 0));
  if (!zf) detail::fail(ErrorKind::io, mwhere, member_error(zip_get_error(za), m, 0));

  LEVATTN_REQUIRE_FILE(m.size < static_cast<std::uint64_t>(std::numeric_limits<std::ptrdiff_t>::max()), mwhere,
                       "size ", m.size, " is too large for this machine's memory");
  // One byte more than expected, so that data that decodes to more is caught.
  const std::uint64_t limit = m.size + 1;
  std::vector<std::uint8_t> out(static_cast<std::size_t>(std::min<std::uint64_t>(
      limit, std::max<std::uint64_t>(std::uint64_t{1} << 16, std::uint64_t{4} * m.compressed))));
  std::size_t produced = 0;
  for (;;) {
    if (produced == out.size()) {
      if (out.size() >= limit) break;  // decoded more than expected
      out.resize(
          static_cast<std::size_t>(std::min<std::uint64_t>(limit, 2 * std::uint64_t{out.size()})));
    }
    const zip_int64_t r = zip_fread(zf.get(), out.data() + produced, out.size() - produced);
    if (r < 0) detail::fail(ErrorKind::io, mwhere, member_error(zip_file_get_error(zf.get()), m, produced));
    if (r == 0) break;  // the end: libzip has verified the CRC-32 and the size
    produced += static_cast<std::size_t>(r);
  }
  LEVATTN_REQUIRE_FILE(produced <= m.size, mwhere, m.method == ZIP_CM_DEFLATE ? "deflate data" : "data",
                       " decodes to more than the ", m.size, " bytes the archive says");
  LEVATTN_REQUIRE_FILE(produced >= m.size, mwhere, m.method == ZIP_CM_DEFLATE ? "deflate data" : "data",
                       " decodes to ", produced, " bytes, the archive says ", m.size);
  out.resize(produced);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// The archive with no members: the end-of-central-directory record alone (libzip writes no file
/// for an archive without entries).
std::vector<std::uint8_t> empty_archive() {
  std::vector<std::uint8_t> out;
  detail::append_le32(out, 0x06054b50);
  out.resize(kEocdSize, 0);
  return out;
}

/// The bytes of a written buffer source.
std::vector<std::uint8_t> source_bytes(zip_source_t* src, const std::string& where) {
  zip_stat_t st;
  zip_stat_init(&st);
  if (zip_source_stat(src, &st) != 0 || !(st.valid & ZIP_STAT_SIZE))
    detail::fail(ErrorKind::io, where, "cannot build the ZIP archive: ", libzip_message(zip_source_error(src)));
  if (zip_source_open(src) != 0)
    detail::fail(ErrorKind::io, where, "cannot build the ZIP archive: ", libzip_message(zip_source_error(src)));
  struct Closer {
    zip_source_t* src;
    ~Closer() { zip_source_close(src); }
  } closer{src};
  std::vector<std::uint8_t> out(static_cast<std::size_t>(st.size));
  std::size_t done = 0;
  while (done < out.size()) {
    const zip_int64_t r = zip_source_read(src, out.data() + done, out.size() - done);
    if (r <= 0)
      detail::fail(ErrorKind::io, where, "cannot build the ZIP archive: ", libzip_message(zip_source_error(src)));
    done += static_cast<std::size_t>(r);
  }
  return out;
}

/// A stored archive of `arrays` (validated by the caller), built in memory by libzip.
std::vector<std::uint8_t> build_archive(const std::vector<std::pair<std::string, Array>>& arrays,
                                        const std::string& where) {
  const auto build_error = [&](zip_error_t* e) {
    detail::fail(ErrorKind::io, where, "cannot build the ZIP archive: ", libzip_message(e));
  };
  ZipError err;
  const Source out(zip_source_buffer_create(nullptr, 0, 0, &err.error));
  if (!out) build_error(&err.error);
  Archive za(zip_open_from_source(out.get(), ZIP_TRUNCATE, &err.error));
  if (!za) build_error(&err.error);
  zip_source_keep(out.get());  // the archive's reference goes with zip_close; ours stays

  // The .npy headers must outlive zip_close, which reads the member sources.
  std::vector<std::vector<std::uint8_t>> headers(arrays.size());
  for (std::size_t i = 0; i < arrays.size(); ++i) {
    const auto& [name, array] = arrays[i];
    headers[i] = detail::npy_header_bytes(array);
    const std::span<const std::uint8_t> values = detail::value_bytes(array);
    const std::array<zip_buffer_fragment_t, 2> pieces = {
        zip_buffer_fragment_t{headers[i].data(), headers[i].size()},
        zip_buffer_fragment_t{const_cast<std::uint8_t*>(values.data()), values.size()}};
    // The fragments are read, never written or freed (freep = 0); the cast only removes const.
    Source member(
        zip_source_buffer_fragment_create(pieces.data(), values.empty() ? 1 : 2, 0, &err.error));
    if (!member) build_error(&err.error);
    const std::string member_name = name + ".npy";
    const zip_int64_t index = zip_file_add(za.get(), member_name.c_str(), member.get(), 0);
    if (index < 0) {
      detail::fail(ErrorKind::io, where, "array '", display_name(name), "': cannot add it to the ZIP archive: ",
                   libzip_message(zip_get_error(za.get())));
    }
    (void)member.release();  // the archive owns it now
    const auto idx = static_cast<zip_uint64_t>(index);
    if (zip_set_file_compression(za.get(), idx, ZIP_CM_STORE, 0) != 0 ||
        zip_file_set_dostime(za.get(), idx, 0, kDosDate1980, 0) != 0 ||
        zip_file_set_external_attributes(za.get(), idx, 0, ZIP_OPSYS_UNIX, 0100644u << 16) != 0) {
      build_error(zip_get_error(za.get()));
    }
  }
  if (zip_close(za.get()) != 0) build_error(zip_get_error(za.get()));
  (void)za.release();  // zip_close freed it
  return source_bytes(out.get(), where);
}

}  // namespace

std::vector<std::pair<std::string, Array>> read_npz(const std::filesystem::path& path) {
  const std::string where = path.string();
  const std::vector<std::uint8_t> file = detail::read_file(path, where);
  // libzip opens an empty file as an empty archive; numpy (and every ZIP reader) refuses it.
  LEVATTN_REQUIRE_FILE(!file.empty(), where, "not a ZIP archive: the file is empty");

  // The directory first, to check every member by name before anything else.
  ZipError err;
  const Archive directory = open_archive(file, ZIP_RDONLY, err);
  LEVATTN_REQUIRE_FILE(directory, where, directory_error(err));
  const zip_int64_t count = zip_get_num_entries(directory.get(), 0);
  LEVATTN_REQUIRE_FILE(count >= 0, where, "cannot read the ZIP archive: ",
                       libzip_message(zip_get_error(directory.get())));

  // Check names, methods and sizes of every member before decoding any.
  std::vector<Member> members;
  std::set<std::string> names;
  for (zip_uint64_t i = 0; i < static_cast<zip_uint64_t>(count); ++i) {
    Member m = stat_member(directory.get(), i, where);
    LEVATTN_REQUIRE_FILE(m.name.size() >= 4 && m.name.compare(m.name.size() - 4, 4, ".npy") == 0, where, "member '",
                         display_name(m.name), "' is not a .npy file (an .npz archive holds only NAME.npy members)");
    LEVATTN_REQUIRE_FILE(names.insert(m.name).second, where + ": member '" + display_name(m.name) + "'",
                         "appears twice in the archive");
    members.push_back(std::move(m));
  }
  // Then the local headers, and the data from the archive that has passed those checks too.
  ZipError cons_err;
  const Archive za = open_archive(file, ZIP_RDONLY | ZIP_CHECKCONS, cons_err);
  LEVATTN_REQUIRE_FILE(za, where, consistency_error(cons_err));
  // libzip chooses between candidate end records by their consistency, so the second opening could
  // in principle pick another directory: it must describe the same members.
  bool same = zip_get_num_entries(za.get(), 0) == count;
  for (std::size_t i = 0; same && i < members.size(); ++i) {
    const Member m = stat_member(za.get(), members[i].index, where);
    same = m.name == members[i].name && m.method == members[i].method &&
           m.compressed == members[i].compressed && m.size == members[i].size;
  }
  LEVATTN_REQUIRE_FILE(same, where, "the archive holds two different central directories (it is corrupted)");
  check_no_overlap(members, file.size(), where);

  std::vector<std::pair<std::string, Array>> result;
  result.reserve(members.size());
  for (const Member& m : members) {
    const std::string mwhere = where + ": member '" + display_name(m.name) + "'";
    const std::vector<std::uint8_t> data = read_member(za.get(), m, mwhere);
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
    LEVATTN_REQUIRE(!name.empty(), where, "an array name is empty");
    LEVATTN_REQUIRE(name.find('\0') == std::string::npos && name.size() <= kMax16 - 4, where, "array name '",
                    display_name(name), "' contains a NUL byte or is longer than 65531 bytes");
    LEVATTN_REQUIRE(seen.insert(name).second, where, "array name '", display_name(name), "' appears twice");
    detail::check_writable(array, where + ": array '" + display_name(name) + "'");
  }

  const std::vector<std::uint8_t> bytes =
      arrays.empty() ? empty_archive() : build_archive(arrays, where);
  const std::array<std::span<const std::uint8_t>, 1> pieces = {std::span(bytes)};
  detail::write_file_atomically(path, pieces);
}

}  // namespace levattn
