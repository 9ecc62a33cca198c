// levattn/error.hpp: the one exception type of the library.
#pragma once
#include <stdexcept>
#include <string>

namespace levattn {

/// What went wrong, so that callers (the CLI, the Python layer) can map it to an exit code or an
/// exception type: bad input and I/O problems are the caller's to fix, internal errors are ours.
enum class ErrorKind {
  invalid_argument,  ///< a parameter or an array is not what the function accepts (shape, NaN, eps)
  io,                ///< a file cannot be read or written, or its contents are malformed
  internal,          ///< an invariant of the library failed (a bug) or a LAPACK routine failed
};

/// Every failure the library reports is a levattn::Error. The message names the argument or file,
/// the field and what was expected.
class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace levattn
