// detail/require.hpp: the one precondition helper. Every check of an argument, an option or a
// file's contents throws through it, so that each message has the form "field: detail" and each
// Error carries its field.
//
//   LEVATTN_REQUIRE(o.window >= -1, "window", "expected an integer >= 0 (or -1 for none), got ", o.window);
//
// The detail is the remaining arguments streamed in order (operator<<), built only on failure.
#pragma once
#include <sstream>
#include <string>
#include <string_view>

#include "levattn/error.hpp"

namespace levattn::detail {

/// Throws Error(kind, field, the parts streamed in order); an empty field gives an error that
/// concerns no one argument.
template <class... Parts>
[[noreturn]] [[gnu::cold]] [[gnu::noinline]] void fail(ErrorKind kind, std::string_view field, const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw Error(kind, std::string(field), os.str());
}

/// Untrusted text as a message quotes it: bytes below 0x20 and 0x7f escaped as \xNN (a NUL would
/// end the message wherever it becomes a C string: a Python exception, a terminal), bytes from
/// 0x80 kept (UTF-8) unless `ascii_only` (then escaped too: a file's binary header), and at most
/// `limit` bytes of it followed by "...".
std::string printable(std::string_view text, std::size_t limit = 80, bool ascii_only = false);

}  // namespace levattn::detail

/// Throws Error(invalid_argument, field, detail...) unless cond holds.
#define LEVATTN_REQUIRE(cond, field, ...)                                                         \
  do {                                                                                            \
    if (!(cond)) [[unlikely]]                                                                     \
      ::levattn::detail::fail(::levattn::ErrorKind::invalid_argument, field, __VA_ARGS__);        \
  } while (false)

/// Throws Error(io, file, detail...) unless cond holds: a file's contents are not what we read.
#define LEVATTN_REQUIRE_FILE(cond, file, ...)                                                     \
  do {                                                                                            \
    if (!(cond)) [[unlikely]] ::levattn::detail::fail(::levattn::ErrorKind::io, file, __VA_ARGS__); \
  } while (false)

/// Throws Error(internal, "", detail...) unless cond holds: an invariant of the library failed.
#define LEVATTN_ASSERT(cond, ...)                                                                 \
  do {                                                                                            \
    if (!(cond)) [[unlikely]] ::levattn::detail::fail(::levattn::ErrorKind::internal, "", __VA_ARGS__); \
  } while (false)
