// Fuzz harness of the stream state loader (StreamingUniversalSet::load, the state of
// `levattn stream --resume`). A state is an .npz archive whose members the zip's CRC-32 guards, so
// that mutated bytes mostly stop at the CRC; the input is therefore the members themselves:
//
//   repeated { u16 name length, name, u32 image length, .npy image }   (little-endian)
//
// Members whose image does not decode are left out; the rest are written as an .npz archive with
// valid CRCs, and load() must accept or reject it (Error of kind io naming the file). An accepted
// state must be one the library can go on with: keys pushed to it, its universal set (ascending
// indices in [0, n), one score each), its heavy entries and its attention all work or reject their
// arguments, and save() then load() gives back the same state.
#include <cmath>
#include <vector>

#include "fuzz/harness.hpp"
#include "levattn/io.hpp"
#include "levattn/streaming.hpp"
#include "npy_format.hpp"

namespace {

using levattn::Array;
using levattn::index_t;
using levattn::StreamingUniversalSet;
namespace fz = levattn::fuzz;

std::vector<std::pair<std::string, Array>> decode_members(std::span<const std::uint8_t> in) {
  std::vector<std::pair<std::string, Array>> members;
  std::size_t at = 0;
  const auto take = [&](std::size_t n) {
    const std::size_t got = std::min(n, in.size() - at);
    const std::span<const std::uint8_t> s = in.subspan(at, got);
    at += got;
    return s;
  };
  while (at + 2 <= in.size()) {
    const std::span<const std::uint8_t> len = take(2);
    const std::span<const std::uint8_t> name = take(levattn::detail::load_le16(len.data()));
    if (at + 4 > in.size()) break;
    const std::span<const std::uint8_t> image = take(levattn::detail::load_le32(take(4).data()));
    std::string text(name.begin(), name.end());
    if (text.empty() || text.find('\0') != std::string::npos) continue;
    Array a;
    if (!fz::accepted([&] { a = levattn::detail::parse_npy(image, "member"); }, "member")) continue;
    bool seen = false;
    for (const auto& m : members) seen = seen || m.first == text;
    if (!seen) members.emplace_back(std::move(text), std::move(a));
  }
  return members;
}

// A few keys (and values) the accepted state can take: small integers, so never an overflow.
void push_keys(StreamingUniversalSet& s, index_t rows) {
  const index_t d = s.d(), dv = s.dv();
  std::vector<float> keys(static_cast<std::size_t>(rows * d)), values(static_cast<std::size_t>(rows * dv));
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = static_cast<float>(static_cast<int>(i % 7) - 3);
  for (std::size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(i % 5);
  s.push({keys.data(), rows, d}, {values.data(), dv > 0 ? rows : 0, dv});
}

void check_usable(StreamingUniversalSet& s, const std::string& where) {
  if (s.d() > 64 || s.dv() > 64) return;  // pushing keys is O(d^2) per key: kept small
  const index_t before = s.n();
  if (!fz::accepted([&] { push_keys(s, 3); }, "")) return;
  LEVATTN_FUZZ_CHECK(s.n() == before + 3, "push did not count its keys");
  levattn::UniversalSet u;
  if (!fz::accepted([&] { u = s.universal_set(); }, "")) return;
  LEVATTN_FUZZ_CHECK(u.indices.size() == u.scores.size(), "a universal set with indices and scores of different sizes");
  for (std::size_t i = 0; i < u.indices.size(); ++i) {
    LEVATTN_FUZZ_CHECK(u.indices[i] >= 0 && u.indices[i] < s.n() && (i == 0 || u.indices[i] > u.indices[i - 1]),
                       "universal set indices not ascending in [0, n)");
    LEVATTN_FUZZ_CHECK(!std::isnan(u.scores[i]), "a NaN score in the universal set");
  }
  std::vector<float> q(static_cast<std::size_t>(2 * s.d()), 1.0f);
  (void)fz::accepted([&] { (void)s.heavy_entries({q.data(), 2, s.d()}); }, "");
  if (s.dv() > 0) (void)fz::accepted([&] { (void)s.attention({q.data(), 2, s.d()}); }, "");
  // save then load: the same state, so the same set.
  const std::filesystem::path copy = fz::scratch_dir() / "copy.npz";
  s.save(copy);
  const StreamingUniversalSet again = StreamingUniversalSet::load(copy);
  const levattn::UniversalSet v = again.universal_set();
  LEVATTN_FUZZ_CHECK(again.n() == s.n() && v.indices == u.indices && v.scores == u.scores,
                     "save then load changed the state of " + where);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto members = decode_members({data, size});
  const std::filesystem::path path = fz::scratch_dir() / "state.npz";
  levattn::write_npz(path, members);
  std::unique_ptr<StreamingUniversalSet> state;
  if (!fz::accepted([&] { state = std::make_unique<StreamingUniversalSet>(StreamingUniversalSet::load(path)); },
                    path.string()))
    return 0;
  check_usable(*state, path.string());
  return 0;
}
