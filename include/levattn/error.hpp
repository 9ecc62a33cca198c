// levattn/error.hpp: the one exception type of the library.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

namespace levattn {

/// What went wrong, so that callers (the CLI, the Python layer) can map it to an exit code or an
/// exception type: bad input and I/O problems are the caller's to fix, internal errors are ours.
enum class ErrorKind {
  invalid_argument,  ///< a parameter or an array is not what the function accepts (shape, NaN, eps)
  io,                ///< a file cannot be read or written, or its contents are malformed
  memory,            ///< an allocation failed: the arrays do not fit the memory the process may use
  internal,          ///< an invariant of the library failed (a bug) or a LAPACK routine failed
};

/// "invalid_argument", "io", "memory" or "internal".
std::string to_string(ErrorKind kind);
/// The inverse of to_string. Throws Error(invalid_argument) naming the choices for any other name.
ErrorKind parse_error_kind(const std::string& name);

/// Every failure the library reports is a levattn::Error. The message names the argument or file,
/// the field and what was expected: what() is "field: detail", or the detail alone when the error
/// concerns no one field. field() lets a front end relabel the field with what it knows (the CLI
/// adds the file an argument came from) without parsing the message.
class Error : public std::runtime_error {
 public:
  /// An error that concerns no one argument: what() == message.
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  /// An error about `field` (an argument, an option or a file): what() == field + ": " + detail.
  Error(ErrorKind kind, const std::string& field, const std::string& detail) : Error(kind, "", field, detail) {}

  ErrorKind kind() const noexcept { return kind_; }
  /// The argument, option or file the error concerns ("queries", "top_k", a path); empty if none.
  std::string field() const { return std::string(what() + field_at_, field_size_); }
  /// What was expected and found: what() after the field and its ": ".
  std::string detail() const { return std::string(what() + field_at_ + (field_size_ ? field_size_ + 2 : 0)); }

 protected:
  /// what() == context + ": " + field + ": " + detail, each part and its ": " left out when
  /// empty: a place the error was reported from (an MPI rank) before the field.
  Error(ErrorKind kind, const std::string& context, const std::string& field, const std::string& detail)
      : std::runtime_error((context.empty() ? "" : context + ": ") + (field.empty() ? "" : field + ": ") + detail),
        kind_(kind),
        field_at_(context.empty() ? 0 : context.size() + 2),
        field_size_(field.size()) {}

 private:
  ErrorKind kind_;
  // The field as a substring of what(), so that copying stays noexcept.
  std::size_t field_at_ = 0, field_size_ = 0;
};

}  // namespace levattn
