// The MPI-IO writer of levattn::distributed (write_npy_rows, distributed.hpp), beside the row
// reader (io_rows.cpp): every rank writes its rows of one .npy file at their offsets.
#include <cstdio>
#include <random>

#include "collective.hpp"
#include "detail/validate.hpp"
#include "npy_format.hpp"

namespace levattn {

using namespace collective;

void write_npy_rows(MPI_Comm comm, const std::filesystem::path& path, const std::vector<index_t>& shape,
                    index_t first, index_t rows, const float* local, CommVolume* volume) {
  const Comm c = comm_of(comm, volume);
  const std::size_t dims = shape.size();
  if (dims < 2 || dims > 4) fail_together(path.string(), "expected a 2-D to 4-D shape");
  index_t pairs = 1;
  for (std::size_t a = 0; a + 2 < dims; ++a) pairs *= shape[a];
  const index_t n = shape[dims - 2], cols = shape[dims - 1];
  const Layout l = layout_of(c, first, rows, cols, pairs, path.string());
  if (l.n != n)
    fail_together(path.string(),
                  "the ranks' rows add up to " + std::to_string(l.n) + ", the shape has " + std::to_string(n));
  Array header;
  header.dtype = DType::float32;
  header.shape = shape;
  const std::vector<std::uint8_t> head = detail::npy_header_bytes(header);
  // A temporary name beside the target, chosen by rank 0.
  char tag[17] = {0};
  if (c.rank == 0) std::snprintf(tag, sizeof tag, "%016llx", static_cast<unsigned long long>(std::random_device{}()) << 32 ^ static_cast<unsigned long long>(std::random_device{}()));
  MPI_Bcast(tag, 16, MPI_CHAR, 0, comm);
  c.count(c.rank == 0 ? 16 : 0, c.rank == 0 ? 0 : 16);
  const std::string tmp = path.string() + ".tmp." + tag;
  const auto check = [&](int rc, const char* what) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    detail::fail(ErrorKind::io, path.string(), "cannot ", what, ": ", std::string(msg, static_cast<std::size_t>(len)));
  };
  MPI_File fh = MPI_FILE_NULL;
  bool written = false;
  const auto remove_tmp = [&] {
    if (c.rank == 0) std::remove(tmp.c_str());
  };
  try {
    int rc = MPI_File_open(comm, tmp.c_str(), MPI_MODE_CREATE | MPI_MODE_WRONLY | MPI_MODE_EXCL, MPI_INFO_NULL, &fh);
    agree(c, [&] { check(rc, "create a temporary file beside it"); });
    agree(c, [&] {
      if (c.rank == 0) check(MPI_File_write_at(fh, 0, head.data(), static_cast<int>(head.size()), MPI_BYTE, MPI_STATUS_IGNORE), "write");
      constexpr index_t kChunk = index_t{1} << 26;  // floats per MPI call, well below INT_MAX
      for (index_t s = 0; s < pairs; ++s)
        for (index_t done = 0; done < rows * cols; done += kChunk) {
          const index_t count = std::min(kChunk, rows * cols - done);
          const MPI_Offset at = static_cast<MPI_Offset>(head.size()) +
                                static_cast<MPI_Offset>(4 * ((s * n + first) * cols + done));
          check(MPI_File_write_at(fh, at, local + s * rows * cols + done, static_cast<int>(count), MPI_FLOAT,
                                  MPI_STATUS_IGNORE), "write");
        }
    });
    rc = MPI_File_sync(fh);
    agree(c, [&] { check(rc, "flush"); });
    rc = MPI_File_close(&fh);
    fh = MPI_FILE_NULL;  // closed or not, never closed again
    agree(c, [&] { check(rc, "close"); });
    agree(c, [&] {
      if (c.rank == 0 && std::rename(tmp.c_str(), path.c_str()) != 0)
        detail::fail(ErrorKind::io, path.string(), "cannot move the written file into place");
    });
    written = true;
  } catch (...) {
    if (fh != MPI_FILE_NULL) MPI_File_close(&fh);
    if (!written) remove_tmp();
    throw;
  }
}

}  // namespace levattn
