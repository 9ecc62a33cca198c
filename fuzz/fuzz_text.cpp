// Fuzz harness of the text the library parses: the selection spec (parse_selection, with its
// budgets and every field) and the names of each enumeration. The first byte chooses the parser,
// the rest is the text. A parser returns or throws Error(invalid_argument) naming the text it
// read; what it returns must print back (to_string, selection_spec) as text that parses to the same
// value. An accepted selection must then run: attention over a small fixed Q, K, V (with one
// head causal) returns finite rows or rejects the options with an Error, never anything else.
#include <cmath>
#include <string>
#include <vector>

#include "fuzz/harness.hpp"
#include "levattn/levattn.hpp"

namespace {

namespace fz = levattn::fuzz;
using levattn::index_t;

// name -> value -> name: the value's name must parse back to the same value.
template <class Parse>
void check_name(Parse parse, const std::string& text) {
  decltype(parse(text)) value{};
  if (!fz::accepted([&] { value = parse(text); }, "")) return;
  using levattn::to_string;
  const std::string name = to_string(value);
  LEVATTN_FUZZ_CHECK(parse(name) == value, "the name '" + name + "' does not parse back to its value");
}

// Q, K, V of 2 heads x 9 rows x 3 columns: small integers, so every logit is exact.
void run_selection(levattn::AttentionOptions o, bool causal) {
  constexpr index_t heads = 2, n = 9, d = 3;
  std::vector<float> qkv(static_cast<std::size_t>(heads * n * d));
  for (std::size_t i = 0; i < qkv.size(); ++i) qkv[i] = static_cast<float>(static_cast<int>((i * 7) % 5) - 2);
  const levattn::Tensor4Ref t{qkv.data(), 1, heads, n, d};
  std::vector<float> out(qkv.size(), -1.0f);
  o.causal = causal;
  if (!fz::accepted([&] { (void)levattn::attention(t, t, t, out.data(), o); }, "")) return;
  for (float v : out) LEVATTN_FUZZ_CHECK(std::isfinite(v), "attention returned a value that is not finite");
}

void check_selection(const std::string& spec) {
  levattn::AttentionOptions o;
  if (!fz::accepted([&] { o = levattn::parse_selection(spec); }, "selection '")) return;
  const std::string printed = levattn::selection_spec(o);
  levattn::AttentionOptions again;
  LEVATTN_FUZZ_CHECK(fz::accepted([&] { again = levattn::parse_selection(printed); }, ""),
                     "selection_spec wrote '" + printed + "', which parse_selection refuses");
  LEVATTN_FUZZ_CHECK(levattn::selection_spec(again) == printed,
                     "'" + printed + "' parses to another selection: '" + levattn::selection_spec(again) + "'");
  // Budgets and counts past the 9 keys change nothing but the time: kept to what runs quickly.
  if (o.cluster_iterations > 64 || o.leverage.sketch_size > 4096 || o.leverage.jl_columns > 4096) return;
  run_selection(o, false);
  run_selection(o, true);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  switch (data[0] % 12) {
    case 0: return check_name(levattn::parse_select, text), 0;
    case 1: return check_name(levattn::parse_kernel, text), 0;
    case 2: return check_name(levattn::parse_precision, text), 0;
    case 3: return check_name(levattn::parse_score_method, text), 0;
    case 4: return check_name(levattn::parse_sketch_kind, text), 0;
    case 5: return check_name(levattn::parse_normaliser, text), 0;
    case 6: return check_name(levattn::parse_heavy_search, text), 0;
    case 7: return check_name(levattn::parse_reduce_method, text), 0;
    case 8: return check_name(levattn::parse_dtype, text), 0;
    case 9: return check_name(levattn::parse_error_kind, text), 0;
    default: return check_selection(text), 0;  // the spec gets two shares of the inputs
  }
}
