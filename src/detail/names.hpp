// detail/names.hpp: the one way an enum gets its names: a table of (value, name) pairs from which
// to_string and parse_* are made, so that every name the library prints it also reads back.
#pragma once
#include <string>
#include <utility>

#include "detail/require.hpp"

namespace levattn::detail {

/// The name of `value` in `table` (an array of (enum, const char*) pairs), "unknown" if absent.
template <class Table, class E>
std::string name_of(const Table& table, E value) {
  for (const auto& [e, name] : table)
    if (e == value) return name;
  return "unknown";
}

/// The value named `text` in `table`. Throws Error(invalid_argument) "<field>: expected a, b or
/// c, got 'text'" for any other text.
template <class Table>
auto parse_name(const Table& table, const std::string& text, const char* field) {
  for (const auto& [e, name] : table)
    if (text == name) return e;
  std::string choices;
  for (std::size_t i = 0; i < std::size(table); ++i)
    choices += (i == 0 ? "" : i + 1 == std::size(table) ? " or " : ", ") + std::string(table[i].second);
  fail(ErrorKind::invalid_argument, field, "expected ", choices, ", got '", printable(text), "'");
}

}  // namespace levattn::detail
