// Fuzz harness of the .npz reader: the input is a whole .npz file. read_npz must return its
// members or reject it with an Error naming the file; what it returns must be NAME.npy members,
// each named once, and must survive write_npz and read_npz unchanged (names, order, dtypes,
// shapes and bits).
#include <cstring>
#include <set>

#include "fuzz/harness.hpp"
#include "levattn/io.hpp"

namespace {

using levattn::Array;
using levattn::fuzz::same_bits;
namespace fz = levattn::fuzz;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::filesystem::path path = fz::write_scratch("input.npz", {data, size});
  std::vector<std::pair<std::string, Array>> members;
  if (!fz::accepted([&] { members = levattn::read_npz(path); }, path.string())) return 0;
  std::set<std::string> names;
  for (const auto& [name, array] : members) {
    LEVATTN_FUZZ_CHECK(names.insert(name).second, "read_npz returned the member '" + name + "' twice");
    LEVATTN_FUZZ_CHECK(!array.shape.empty() && array.shape.size() <= 4, "a member of 0 or more than 4 dimensions");
  }
  // Names read_npz returns can be written again, except those write_npz refuses (empty, NUL).
  const std::filesystem::path copy = fz::scratch_dir() / "copy.npz";
  if (!fz::accepted([&] { levattn::write_npz(copy, members); }, copy.string())) return 0;
  const auto again = levattn::read_npz(copy);
  LEVATTN_FUZZ_CHECK(again.size() == members.size(), "write_npz then read_npz changed the number of members");
  for (std::size_t i = 0; i < again.size(); ++i)
    LEVATTN_FUZZ_CHECK(again[i].first == members[i].first && same_bits(again[i].second, members[i].second),
                       "write_npz then read_npz changed the member '" + members[i].first + "'");
  return 0;
}
