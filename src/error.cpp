#include <bit>
#include <sys/resource.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <algorithm>

#include "detail/names.hpp"
#include "detail/validate.hpp"
#include "kernels/elementwise.hpp"

namespace levattn::detail {

namespace {

// Over x[0 .. n): whether any entry is NaN or Inf, and max |x_j|, by the vectorised kernel of
// the CPU's instruction set.
struct Scan {
  bool bad = false;
  float max_abs = 0.0f;
};

Scan scan(const kernels::RowOps& ops, const float* x, index_t n) {
  const float m = ops.max_abs(x, n);
  return {m < 0.0f, m < 0.0f ? 0.0f : m};
}

// scan() over the whole matrix: contiguous rows as runs of up to 2^14 entries, else row by row.
Scan scan_matrix(ConstMatrix A) {
  const bool flat = A.ld == A.cols;
  const index_t total = A.rows * A.cols, chunk = index_t{1} << 14;
  const index_t tasks = flat ? (total + chunk - 1) / chunk : A.rows;
  bool bad = false;
  float best = 0.0f;
  const kernels::RowOps& ops = kernels::active_row_ops();  // may throw: outside the region
#pragma omp parallel for schedule(static) reduction(|| : bad) reduction(max : best) if (total > (1 << 16))
  for (index_t t = 0; t < tasks; ++t) {
    const Scan sc = flat ? scan(ops, A.data + t * chunk, std::min(chunk, total - t * chunk))
                         : scan(ops, A.row(t), A.cols);
    bad = bad || sc.bad;
    best = sc.max_abs > best ? sc.max_abs : best;
  }
  return {bad, best};
}

// Names the first non-finite entry (row-major order).
[[noreturn]] void non_finite(ConstMatrix A, const char* what) {
  for (index_t i = 0; i < A.rows; ++i)
    for (index_t j = 0; j < A.cols; ++j)
      LEVATTN_REQUIRE(std::isfinite(A(i, j)), what, "expected finite values, found ", A(i, j), " at row ", i,
                      ", column ", j);
  fail(ErrorKind::internal, what, "non-finite entry not found again");
}

void require_non_empty(ConstMatrix A, const char* what) {
  LEVATTN_REQUIRE(A.rows > 0 && A.cols > 0, what, "expected a non-empty matrix, got shape (", A.rows, ", ", A.cols,
                  ")");
}

}  // namespace

void require_finite_matrix(ConstMatrix A, const char* what) {
  require_non_empty(A, what);
  if (scan_matrix(A).bad) non_finite(A, what);
}

double max_abs_or_non_finite(const kernels::RowOps& ops, const float* x, index_t n) {
  const Scan sc = scan(ops, x, n);
  return sc.bad ? -1.0 : static_cast<double>(sc.max_abs);
}

double finite_max_abs(ConstMatrix A, const char* what) {
  require_non_empty(A, what);
  const Scan sc = scan_matrix(A);
  if (sc.bad) non_finite(A, what);
  return static_cast<double>(sc.max_abs);
}

index_t to_index(double x) {
  constexpr double kMax = 4611686018427387904.0;  // 2^62
  return !(x > 0.0) ? 0 : x >= kMax ? static_cast<index_t>(kMax) : static_cast<index_t>(x);
}

void require_open_unit(double v, const char* what) {
  LEVATTN_REQUIRE(v > 0.0 && v < 1.0, what, "expected a number in (0, 1), got ", v);
}

void require_eps(double eps, const char* what) {
  LEVATTN_REQUIRE(eps > 0.0 && eps <= 1.0, what, "expected a number in (0, 1], got ", eps);
}

}  // namespace levattn::detail

namespace levattn {
namespace {

constexpr std::pair<ErrorKind, const char*> kErrorKindNames[] = {
    {ErrorKind::invalid_argument, "invalid_argument"},
    {ErrorKind::io, "io"},
    {ErrorKind::memory, "memory"},
    {ErrorKind::internal, "internal"}};

}  // namespace

std::string to_string(ErrorKind kind) { return detail::name_of(kErrorKindNames, kind); }
ErrorKind parse_error_kind(const std::string& name) { return detail::parse_name(kErrorKindNames, name, "error kind"); }

std::string detail::printable(std::string_view text, std::size_t limit, bool ascii_only) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  for (const char ch : text) {
    if (out.size() >= limit) return out + "...";
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c != 0x7f && !(ascii_only && c > 0x7f)) {
      out += ch;
    } else {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

index_t checked_elements(std::initializer_list<index_t> dims, const std::string& what) {
  constexpr index_t kMax = index_t{1} << 62;
  index_t product = 1;
  bool negative = false, over = false;
  for (index_t v : dims) {
    negative = negative || v < 0;
    if (negative || over) continue;
    if (v != 0 && product > kMax / v) over = true;
    else product *= v;
  }
  if (negative || over) {
    std::ostringstream shape;
    for (index_t v : dims) shape << (shape.tellp() > 0 ? " x " : "") << v;
    detail::fail(ErrorKind::invalid_argument, what,
                 negative ? "expected non-negative dimensions, got " + shape.str() : shape.str() + " elements exceed 2^62");
  }
  return product;
}

namespace {

// A property of the machine, read once (sysconf(_SC_PHYS_PAGES) is a system call).
double physical_memory() {
  static const double bytes = [] {
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE)),
                 pages = static_cast<double>(sysconf(_SC_PHYS_PAGES));
    return page > 0 && pages > 0 ? page * pages : INFINITY;
  }();
  return bytes;
}

[[noreturn]] void too_large(double bytes, const std::string& what, const std::string& shape) {
  std::ostringstream os;
  os.precision(3);
  os << "needs " << bytes << " bytes" << (shape.empty() ? "" : " (" + shape + ")") << ", more than the "
     << physical_memory() / 1073741824.0 << " GiB of memory this machine has";
  detail::fail(ErrorKind::invalid_argument, what, os.str());
}

}  // namespace

void allocation_failed(double bytes, const std::string& what, const std::string& shape) {
  std::ostringstream os;
  os.precision(4);
  os << "cannot allocate " << bytes << " bytes" << (shape.empty() ? "" : " (" + shape + ")") << ": out of memory";
  rlimit limit{};
  if (getrlimit(RLIMIT_AS, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY)
    os << " (this process may use " << static_cast<double>(limit.rlim_cur) << " bytes of address space: ulimit -v)";
  detail::fail(ErrorKind::memory, what, os.str());
}

double require_memory(double bytes, const std::string& what) {
  if (bytes > physical_memory()) too_large(bytes, what, "");
  return bytes;
}

index_t checked_allocation(std::initializer_list<index_t> dims, std::size_t elem_size, const std::string& what) {
  // In double first: the product may not fit any integer type.
  double bytes = static_cast<double>(elem_size);
  for (index_t v : dims) {
    if (v < 0) return checked_elements(dims, what);  // throws, naming the negative dimension
    bytes *= static_cast<double>(v);
  }
  if (bytes > physical_memory() || bytes >= 4611686018427387904.0) {
    std::ostringstream shape;
    for (index_t v : dims) shape << v << " x ";
    shape << elem_size << " bytes";
    too_large(bytes, what, shape.str());
  }
  return checked_elements(dims, what);
}

}  // namespace levattn
