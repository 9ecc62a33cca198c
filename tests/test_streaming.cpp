// The streaming universal set against the offline one (any block sizes), brute-force heavy
// entries, attention over the offline set, and its state files (restored bit for bit, damaged
// ones rejected).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "levattn/levattn.hpp"
#include "oracle.hpp"

namespace {

using levattn::ConstMatrix;
using levattn::index_t;
using levattn::StreamingUniversalSet;
using oracle::Mat;

// Pushes rows [0, n) of K (and V) in blocks whose sizes cycle through `sizes`.
void push_all(StreamingUniversalSet& s, const Mat& K, const Mat* V, const std::vector<index_t>& sizes,
              index_t from = 0) {
  for (index_t i = from, b = 0; i < K.rows; ++b) {
    const index_t rows = std::min(sizes[b % sizes.size()], K.rows - i);
    const ConstMatrix k{K.v.data() + i * K.cols, rows, K.cols};
    const ConstMatrix v = V ? ConstMatrix{V->v.data() + i * V->cols, rows, V->cols} : ConstMatrix{};
    s.push(k, v);
    i += rows;
  }
}

// Keys with a few strong directions, so that the set is a small part of n (and pruning works).
Mat spiky_keys(index_t n, index_t d, std::uint64_t seed) {
  Mat K = oracle::gaussian(n, d, seed, 0.05);
  std::mt19937_64 g(seed);
  for (index_t a = 0; a < 3 * d; ++a) {
    const auto i = static_cast<index_t>(g() % static_cast<std::uint64_t>(n));
    K(i, a % d) += 4.0f;
  }
  return K;
}

void expect_same_set(const levattn::UniversalSet& got, const levattn::UniversalSet& want, const std::string& what) {
  EXPECT_EQ(got.indices, want.indices) << what;
  EXPECT_EQ(got.scores, want.scores) << what;  // same M bits, same factor, same score pass
  EXPECT_EQ(got.n, want.n) << what;
  EXPECT_EQ(got.rank, want.rank) << what;
  EXPECT_EQ(got.size_bound, want.size_bound) << what;
  EXPECT_EQ(got.score_rel_error_bound, want.score_rel_error_bound) << what;
}

TEST(Streaming, EqualsTheOfflineSetForAnyBlockSizes) {
  const std::vector<std::vector<index_t>> splits = {{1}, {7}, {1000}, {1024}, {5000}, {3, 1500, 1, 64}};
  for (const auto& [n, d, eps] : {std::tuple<index_t, index_t, double>{5000, 8, 0.05},
                                  {3000, 40, 0.2}, {2500, 5, 1.0}}) {
    const Mat K = spiky_keys(n, d, static_cast<std::uint64_t>(n + d));
    const levattn::UniversalSet want = levattn::universal_set(K.view(), eps);
    if (eps < 1.0) {  // a small part of the keys (eps = 1: the edge case of an empty set)
      ASSERT_GT(want.indices.size(), 0u);
      ASSERT_LT(want.indices.size(), static_cast<std::size_t>(n / 10));
    }
    for (const auto& sizes : splits) {
      StreamingUniversalSet s(d, 0, eps);
      push_all(s, K, nullptr, sizes);
      EXPECT_EQ(s.n(), n);
      expect_same_set(s.universal_set(), want, "n " + std::to_string(n) + " first block " + std::to_string(sizes[0]));
      EXPECT_LT(s.candidates(), n);  // pruned along the way
    }
  }
}

TEST(Streaming, EveryPrefixIsTheOfflineSetOfThatPrefix) {
  const Mat K = spiky_keys(3000, 6, 3);
  StreamingUniversalSet s(6, 0, 0.1);
  for (index_t i = 0; i < 3000; i += 250) {
    s.push(ConstMatrix{nullptr, 0, 6});  // no rows: a no-op
    s.push({K.v.data() + i * 6, 250, 6});
    const levattn::UniversalSet want = levattn::universal_set({K.v.data(), i + 250, 6}, 0.1);
    expect_same_set(s.universal_set(), want, "prefix " + std::to_string(i + 250));
  }
}

TEST(Streaming, RankDeficientFewAndRidgeKeys) {
  // Duplicated rows and a zero column (rank < d), fewer keys than d, and ridge scores.
  Mat K = spiky_keys(2100, 6, 5);
  for (index_t i = 0; i < 2100; ++i) K(i, 5) = 0.0f;
  for (index_t i = 1000; i < 1100; ++i)
    for (index_t x = 0; x < 6; ++x) K(i, x) = K(i - 1000, x);
  for (levattn::LeverageOptions o : {levattn::LeverageOptions{}, levattn::LeverageOptions{.ridge = 0.5}}) {
    StreamingUniversalSet s(6, 0, 0.05, o);
    push_all(s, K, nullptr, {333});
    expect_same_set(s.universal_set(), levattn::universal_set(K.view(), 0.05, o), "ridge " + std::to_string(o.ridge));
  }
  const Mat few = oracle::gaussian(5, 9, 6);  // n < d: every score 1
  StreamingUniversalSet t(9, 0, 0.5);
  push_all(t, few, nullptr, {2});
  expect_same_set(t.universal_set(), levattn::universal_set(few.view(), 0.5), "n < d");
  EXPECT_EQ(t.universal_set().indices.size(), 5u);
}

// A direction numerically null when pruning runs (singular value ratio 7.8e-6 < rank_rtol
// 1e-5) enters the final rank when a second key adds to it: the key that was alone in it must
// still be there.
TEST(Streaming, ADirectionThatEntersTheRankLaterKeepsItsKeys) {
  Mat K(1026, 2);
  K(0, 1) = 2.5e-4f;
  for (index_t i = 1; i <= 1024; ++i) K(i, 0) = 1.0f;
  K(1025, 1) = 2.5e-4f;
  StreamingUniversalSet s(2, 0, 0.4);
  s.push({K.v.data(), 1025, 2});  // more than 1024 candidates: a prune runs here
  s.push({K.v.data() + 1025 * 2, 1, 2});
  const levattn::UniversalSet want = levattn::universal_set(K.view(), 0.4);
  EXPECT_EQ(want.indices, (std::vector<index_t>{0, 1025}));
  expect_same_set(s.universal_set(), want, "late direction");
}

TEST(Streaming, HeavyEntriesEqualBruteForce) {
  const Mat K = spiky_keys(4000, 8, 7);
  Mat Q = oracle::gaussian(300, 8, 8);
  for (index_t x = 0; x < 8; ++x) Q(0, x) = 0.0f;  // a zero row
  for (index_t x = 0; x < 8; ++x) Q(1, x) = K(17, x);  // aligned with a key
  StreamingUniversalSet s(8, 0, 0.1);
  push_all(s, K, nullptr, {777});
  const levattn::HeavyEntries got = s.heavy_entries(Q.view());
  const levattn::HeavyEntries truth = levattn::heavy_entries_brute_force(Q.view(), K.view(), 0.1);
  ASSERT_GT(truth.entries.size(), 10u);
  ASSERT_EQ(got.entries.size(), truth.entries.size());
  for (std::size_t a = 0; a < got.entries.size(); ++a) {
    EXPECT_EQ(got.entries[a].query, truth.entries[a].query);
    EXPECT_EQ(got.entries[a].key, truth.entries[a].key);
    EXPECT_NEAR(got.entries[a].value, truth.entries[a].value, 1e-9);
  }
  EXPECT_EQ(got.zero_rows, std::vector<index_t>{0});
}

TEST(Streaming, AttentionIsOverTheOfflineSet) {
  const Mat K = spiky_keys(3000, 8, 9), V = oracle::gaussian(3000, 5, 10), Q = oracle::gaussian(50, 8, 11);
  StreamingUniversalSet s(8, 5, 0.05);
  push_all(s, K, &V, {1, 999});
  const levattn::UniversalSet u = levattn::universal_set(K.view(), 0.05);
  Mat KU(static_cast<index_t>(u.indices.size()), 8), VU(KU.rows, 5);
  for (index_t a = 0; a < KU.rows; ++a) {
    for (index_t x = 0; x < 8; ++x) KU(a, x) = K(u.indices[a], x);
    for (index_t x = 0; x < 5; ++x) VU(a, x) = V(u.indices[a], x);
  }
  for (levattn::Kernel kernel : {levattn::Kernel::softmax, levattn::Kernel::power}) {
    levattn::AttentionOptions o;
    o.kernel = kernel;
    EXPECT_EQ(s.attention(Q.view(), o), levattn::attention(Q.view(), KU.view(), VU.view(), o));
  }
}

TEST(Streaming, WorkspaceDoesNotGrowWithTheKeys) {
  // Bounded by M, the waiting rows and about 2 d / eps candidates, whatever n.
  std::size_t peak[2];
  for (int r = 0; r < 2; ++r) {
    const index_t n = r == 0 ? 20000 : 200000;
    StreamingUniversalSet s(8, 4, 0.1);
    std::mt19937_64 g(12);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::vector<float> k(1000 * 8), v(1000 * 4);
    for (index_t i = 0; i < n; i += 1000) {
      for (float& x : k) x = nd(g);
      for (float& x : v) x = nd(g);
      s.push({k.data(), 1000, 8}, {v.data(), 1000, 4});
    }
    peak[r] = s.peak_workspace_bytes();
    EXPECT_LE(s.candidates(), 2 * 1024 + 1000);
  }
  EXPECT_LE(static_cast<double>(peak[1]), 1.05 * static_cast<double>(peak[0]));
}

class StreamingState : public ::testing::Test {
 protected:
  std::filesystem::path dir = std::filesystem::temp_directory_path() / ("levattn_stream_" + std::to_string(::getpid()));
  void SetUp() override { std::filesystem::create_directories(dir); }
  void TearDown() override { std::filesystem::remove_all(dir); }
};

TEST_F(StreamingState, RestoredStateGivesBitIdenticalResults) {
  const Mat K = spiky_keys(5000, 8, 13), V = oracle::gaussian(5000, 3, 14), Q = oracle::gaussian(40, 8, 15);
  StreamingUniversalSet a(8, 3, 0.1);
  push_all(a, K, &V, {1700});  // the whole stream in one object
  // Half, save, restore, the rest: the same state and the same answers.
  Mat Kh(2333, 8), Vh(2333, 3);
  std::copy_n(K.v.begin(), 2333 * 8, Kh.v.begin());
  std::copy_n(V.v.begin(), 2333 * 3, Vh.v.begin());
  StreamingUniversalSet b(8, 3, 0.1);
  push_all(b, Kh, &Vh, {1700});
  b.save(dir / "state.npz");
  StreamingUniversalSet c = StreamingUniversalSet::load(dir / "state.npz");
  EXPECT_EQ(c.n(), 2333);
  EXPECT_EQ(c.candidates(), b.candidates());
  expect_same_set(c.universal_set(), b.universal_set(), "restored");
  c.push({K.v.data() + 2333 * 8, 5000 - 2333, 8}, {V.v.data() + 2333 * 3, 5000 - 2333, 3});
  expect_same_set(c.universal_set(), levattn::universal_set(K.view(), 0.1), "continued");
  EXPECT_EQ(c.attention(Q.view()), a.attention(Q.view()));
  c.save(dir / "again.npz");
  a.save(dir / "whole.npz");
  EXPECT_EQ(StreamingUniversalSet::load(dir / "again.npz").universal_set().scores, a.universal_set().scores);
}

TEST_F(StreamingState, DamagedFilesAreClearErrors) {
  StreamingUniversalSet s(4, 2, 0.2);
  const Mat K = oracle::gaussian(3000, 4, 16), V = oracle::gaussian(3000, 2, 17);
  push_all(s, K, &V, {1100});
  s.save(dir / "good.npz");
  std::vector<char> bytes;
  {
    std::ifstream in(dir / "good.npz", std::ios::binary);
    bytes.assign(std::istreambuf_iterator<char>(in), {});
  }
  const auto write = [&](const std::vector<char>& b) {
    std::ofstream out(dir / "bad.npz", std::ios::binary | std::ios::trunc);
    out.write(b.data(), static_cast<std::streamsize>(b.size()));
  };
  const auto message = [&] {
    const auto [kind, what] = oracle::error_of([&] { StreamingUniversalSet::load(dir / "bad.npz"); });
    EXPECT_EQ(kind, levattn::ErrorKind::io);
    EXPECT_NE(what.find("bad.npz"), std::string::npos) << what;
    return what;
  };
  for (std::size_t keep : {std::size_t{0}, std::size_t{10}, std::size_t{100}, bytes.size() / 2, bytes.size() - 1}) {
    write(std::vector<char>(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(keep)));
    EXPECT_FALSE(message().empty()) << keep;
  }
  // A flipped bit in the values' data: the member's CRC-32 fails.
  const auto members = levattn::read_npz(dir / "good.npz");
  std::vector<char> b = bytes;
  const std::string probe(reinterpret_cast<const char*>(members.back().second.f32.data()), 16);  // values' first bytes
  const auto at = std::search(b.begin(), b.end(), probe.begin(), probe.end());
  ASSERT_NE(at, b.end());
  at[3] ^= 0x10;
  write(b);
  EXPECT_NE(message().find("CRC-32"), std::string::npos);
  // One member changed at a time, written as a well-formed archive.
  const auto with = [&](const std::string& name, const levattn::Array& value) {
    auto changed = members;
    if (value.shape.empty()) {  // remove the member
      changed.erase(std::find_if(changed.begin(), changed.end(), [&](const auto& m) { return m.first == name; }));
    } else {
      for (auto& m : changed)
        if (m.first == name) m.second = value;
    }
    levattn::write_npz(dir / "bad.npz", changed);
    return message();
  };
  const auto one = [](std::int64_t x) { return levattn::Array::from_int64({1}, {x}); };
  EXPECT_NE(with("version", one(4)).find("version: expected 3, got 4"), std::string::npos);
  EXPECT_NE(with("protect_first", one(-1)).find("protected"), std::string::npos);
  EXPECT_NE(with("n", one(2999)).find("n:"), std::string::npos);
  EXPECT_NE(with("gram_blocks", one(std::int64_t{1} << 56)).find("n:"), std::string::npos);
  EXPECT_NE(with("keys", levattn::Array{}).find("member 'keys': missing"), std::string::npos);
  EXPECT_NE(with("keys", levattn::Array::from_float64({1, 4}, {1, 2, 3, 4})).find("2-D float32"), std::string::npos);
  EXPECT_NE(with("values", levattn::Array::from_float32({1, 2}, {1, 2})).find("member 'values'"), std::string::npos);
  EXPECT_NE(with("gram_pending", levattn::Array::from_float32({1, 3}, {1, 2, 3})).find("4 columns"), std::string::npos);
  auto index = std::find_if(members.begin(), members.end(), [](const auto& m) { return m.first == "index"; })->second;
  std::reverse(index.i64.begin(), index.i64.end());
  EXPECT_NE(with("index", index).find("ascending"), std::string::npos);
  // A state of version 2 (a binary file) is named as such.
  write({'L', 'V', 'S', 'T', 'R', 'E', 'A', 'M', 2, 0, 0, 0});
  EXPECT_NE(message().find("version-2 binary"), std::string::npos);
  EXPECT_EQ(oracle::error_of([&] { StreamingUniversalSet::load(dir / "missing.npz"); }).first, levattn::ErrorKind::io);
}

TEST(Streaming, RejectsBadArguments) {
  const auto bad = [](auto f) { return oracle::error_of(f).first == levattn::ErrorKind::invalid_argument; };
  EXPECT_TRUE(bad([] { StreamingUniversalSet(0, 0, 0.1); }));
  EXPECT_TRUE(bad([] { StreamingUniversalSet(4, -1, 0.1); }));
  EXPECT_TRUE(bad([] { StreamingUniversalSet(4, 0, 0.0); }));
  EXPECT_TRUE(bad([] { StreamingUniversalSet(4, 0, 1.5); }));
  EXPECT_TRUE(bad([] { StreamingUniversalSet(4, 0, 0.1, {.method = levattn::ScoreMethod::sketch}); }));
  StreamingUniversalSet s(4, 2, 0.1);
  const Mat K = oracle::gaussian(10, 4, 1), V = oracle::gaussian(10, 2, 2), wide = oracle::gaussian(10, 5, 3);
  EXPECT_TRUE(bad([&] { s.push(wide.view(), V.view()); }));
  EXPECT_TRUE(bad([&] { s.push(K.view()); }));  // values missing
  EXPECT_TRUE(bad([&] { s.push(K.view(), wide.view()); }));
  Mat nan = K;
  nan(3, 1) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(bad([&] { s.push(nan.view(), V.view()); }));
  EXPECT_EQ(s.n(), 0);  // nothing was taken
  EXPECT_TRUE(bad([&] { s.attention(K.view()); }));  // no keys yet
  s.push(K.view(), V.view());
  EXPECT_TRUE(bad([&] { s.heavy_entries(wide.view()); }));
  EXPECT_TRUE(bad([] { StreamingUniversalSet(index_t{1} << 31, 0, 0.5); }));  // no 2^62-entry Gram
  StreamingUniversalSet tiny(64, 64, 1e-300);  // an enormous prune floor must not be allocated
  tiny.push(oracle::gaussian(10, 64, 4).view(), oracle::gaussian(10, 64, 5).view());
  EXPECT_LT(tiny.workspace_bytes(), std::size_t(64) << 20);
  StreamingUniversalSet ridge(4, 0, 0.1, {.ridge = 1.0});
  ridge.push(K.view());
  EXPECT_TRUE(bad([&] { ridge.heavy_entries(K.view()); }));
  StreamingUniversalSet keys_only(4, 0, 0.1);
  keys_only.push(K.view());
  EXPECT_TRUE(bad([&] { keys_only.attention(K.view()); }));
}

}  // namespace
