// The streaming x^2 universal set (docs/design.md, "Streaming"): the key Gram as fixed-order
// partial sums, candidates pruned by their prefix scores, and a checksummed state file.
#include "levattn/streaming.hpp"

#include <zlib.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "detail/gram.hpp"
#include "levattn/attention.hpp"
#include "leverage.hpp"
#include "npy_format.hpp"
#include "detail/validate.hpp"

namespace levattn {

// Everything the object holds: M's stream and the candidates.
struct StreamingUniversalSet::State {
  index_t d = 0, dv = 0, n = 0;
  double eps = 0.0;
  LeverageOptions options;
  detail::GramStream gram;
  std::vector<index_t> index;  // candidates: global key index, ascending
  std::vector<float> keys, values;
  index_t prune_at = 0;        // prune once this many candidates are held
  index_t protect_first = 0, protect_last = 0;  // keys pruning keeps whatever their scores
  std::size_t peak = 0;

  index_t size() const { return static_cast<index_t>(index.size()); }
  ConstMatrix key_rows() const { return {keys.data(), size(), d}; }
  std::size_t bytes() const {
    return gram.part.capacity() * sizeof(double) + gram.pending.capacity() * sizeof(float) + gram.buffer_bytes() +
           index.capacity() * sizeof(index_t) + (keys.capacity() + values.capacity()) * sizeof(float);
  }
};

namespace {

// Room pruning leaves for rounding: the score pass's own bound (kFloat32Tolerance at most, unless
// the keys are so ill-conditioned that the float64 pass is needed and bounded above it).
constexpr double kMargin = 1e-4;
constexpr index_t kMinPrune = 1024;

constexpr index_t kMaxDim = index_t{1} << 20;  // d and dv (a d x d Gram of 8 TB is not a stream)

index_t prune_floor(index_t d, double eps) {
  const double floor = std::min(2.0 * std::ceil(static_cast<double>(d) / eps), 0x1p40);  // no overflow for tiny eps
  return std::max(kMinPrune, static_cast<index_t>(floor));
}

KeyGram gram_of(const StreamingUniversalSet::State& s) {
  return detail::gram_factor(s.gram.gram(), s.d, s.options);
}

// The Gram pruning scores against: a direction numerically null now can enter the final rank
// when later keys add to it, which lifts the scores of the keys already there. Such a key ends
// in the set only if it carries at least sqrt(eps) of that direction's final singular value, so
// keeping the directions down to 0.1 sqrt(eps) rank_rtol sigma_max keeps its score honest; exactly
// null directions (a zero column) still drop, and pruning still works.
KeyGram pruning_gram(const StreamingUniversalSet::State& s) {
  LeverageOptions o = s.options;
  o.rank_rtol = 0.1 * std::sqrt(s.eps) * s.options.rank_rtol;
  return detail::gram_factor(s.gram.gram(), s.d, o);
}

// Scores of the candidates against the Gram of every key so far, as the offline pass computes
// them (full row rank of all the keys: every score exactly 1, as leverage_scores says).
LeverageScores candidate_scores(const StreamingUniversalSet::State& s, const KeyGram& g) {
  if (g.rank == s.n && g.ridge == 0.0 && s.n > 0) {
    LeverageScores out;
    out.rank = g.rank;
    out.sum_bound = static_cast<double>(g.rank);
    out.scores.assign(static_cast<std::size_t>(s.size()), 1.0);
    return out;
  }
  return detail::scores_unchecked(s.key_rows(), g, {.rows_of_gram = false});
}

// Room for `more` elements plus `slack`: the candidates shrink at every prune and grow by a
// block at every push; with room for what a prune can leave (slack) beside a block, pushes of
// one size stop reallocating after the first (a range insert would otherwise reallocate to the
// exact size, copying and faulting in the whole array, at every push).
template <class T>
void make_room(std::vector<T>& v, std::size_t more, std::size_t slack) {
  if (v.size() + more > v.capacity()) v.reserve(v.size() + more + slack);
}

// The candidate rows of `indices` (keys the state holds, ascending).
std::vector<index_t> candidate_rows(const StreamingUniversalSet::State& s, const std::vector<index_t>& indices) {
  std::vector<index_t> at(indices.size());
  for (std::size_t a = 0; a < at.size(); ++a)
    at[a] = std::lower_bound(s.index.begin(), s.index.end(), indices[a]) - s.index.begin();
  return at;
}

// Keeps the candidates for which keep(a) holds, in order.
template <class Keep>
void compact(StreamingUniversalSet::State& s, Keep keep) {
  index_t out = 0;
  for (index_t a = 0; a < s.size(); ++a) {
    if (!keep(a)) continue;
    s.index[out] = s.index[a];
    std::copy_n(s.keys.data() + a * s.d, s.d, s.keys.data() + out * s.d);
    std::copy_n(s.values.data() + a * s.dv, s.dv, s.values.data() + out * s.dv);
    ++out;
  }
  s.index.resize(static_cast<std::size_t>(out));
  s.keys.resize(static_cast<std::size_t>(out * s.d));
  s.values.resize(static_cast<std::size_t>(out * s.dv));
}

}  // namespace

StreamingUniversalSet::StreamingUniversalSet(index_t d, index_t dv, double eps, const LeverageOptions& options)
    : s_(std::make_unique<State>()) {
  LEVATTN_REQUIRE(d >= 1 && dv >= 0 && d <= kMaxDim && dv <= kMaxDim, "streaming",
                  "expected 1 <= d <= 2^20 key columns and 0 <= dv <= 2^20 value columns, got d = ", d, ", dv = ", dv);
  detail::require_eps(eps);
  LEVATTN_REQUIRE(options.method == ScoreMethod::exact, "streaming",
                  "method must be exact (a sketch needs every key at once)");
  LEVATTN_REQUIRE((options.ridge >= 0.0 && std::isfinite(options.ridge)) &&
                      (options.rank_rtol >= 0.0 && options.rank_rtol < 1.0),
                  "streaming", "expected ridge >= 0 (finite) and rank_rtol in [0, 1)");
  checked_allocation({d, d, detail::gram_partials(d)}, sizeof(double), "the streamed Gram's partial sums");
  s_->d = d, s_->dv = dv, s_->eps = eps, s_->options = options;
  s_->gram = detail::GramStream(d);
  s_->prune_at = prune_floor(d, eps);
  s_->peak = s_->bytes();
}

StreamingUniversalSet::~StreamingUniversalSet() = default;
StreamingUniversalSet::StreamingUniversalSet(StreamingUniversalSet&&) noexcept = default;
StreamingUniversalSet& StreamingUniversalSet::operator=(StreamingUniversalSet&&) noexcept = default;

index_t StreamingUniversalSet::n() const { return s_->n; }
index_t StreamingUniversalSet::d() const { return s_->d; }
index_t StreamingUniversalSet::dv() const { return s_->dv; }
double StreamingUniversalSet::eps() const { return s_->eps; }
index_t StreamingUniversalSet::candidates() const { return s_->size(); }
std::size_t StreamingUniversalSet::workspace_bytes() const { return s_->bytes(); }
std::size_t StreamingUniversalSet::peak_workspace_bytes() const { return s_->peak; }

void StreamingUniversalSet::push(ConstMatrix keys, ConstMatrix values) {
  State& s = *s_;
  LEVATTN_REQUIRE(!(keys.rows < 0 || (keys.rows > 0 && keys.cols != s.d)), "keys", "expected ", s.d,
                  " columns, got ", keys.cols);
  LEVATTN_REQUIRE(!(s.dv > 0 ? (values.rows != keys.rows || (keys.rows > 0 && values.cols != s.dv)) : values.rows != 0),
                  "values", "expected ", (s.dv > 0 ? keys.rows : 0), " rows of ", s.dv, " columns (one per key), got ",
                  values.rows, " of ", values.cols);
  if (keys.rows == 0) return;
  detail::require_finite_matrix(keys, "keys");
  if (s.dv > 0) detail::require_finite_matrix(values, "values");
  checked_elements({s.size() + keys.rows, s.d + s.dv}, "streaming candidates");
  const auto rows = static_cast<std::size_t>(keys.rows);
  const auto slack = std::min(static_cast<std::size_t>(prune_floor(s.d, s.eps)), s.index.size() + rows);
  make_room(s.index, rows, slack);
  make_room(s.keys, rows * static_cast<std::size_t>(s.d), slack * static_cast<std::size_t>(s.d));
  make_room(s.values, rows * static_cast<std::size_t>(s.dv), slack * static_cast<std::size_t>(s.dv));
  if (keys.ld == s.d) {
    s.gram.add(keys.data, keys.rows);
    s.keys.insert(s.keys.end(), keys.data, keys.data + keys.rows * s.d);
  } else {
    for (index_t i = 0; i < keys.rows; ++i) {
      s.gram.add(keys.row(i), 1);
      s.keys.insert(s.keys.end(), keys.row(i), keys.row(i) + s.d);
    }
  }
  for (index_t i = 0; i < keys.rows; ++i) {
    s.index.push_back(s.n + i);
    if (s.dv > 0) s.values.insert(s.values.end(), values.row(i), values.row(i) + s.dv);
  }
  s.n += keys.rows;
  s.peak = std::max(s.peak, s.bytes());
  if (s.size() > s.prune_at) prune();
}

void StreamingUniversalSet::prune() {
  State& s = *s_;
  const KeyGram g = pruning_gram(s);
  const LeverageScores sc = candidate_scores(s, g);
  // Scores only fall as keys arrive; one below eps by more than any rounding, now or at the end,
  // can never enter the set again.
  const double keep_from = s.eps / ((1.0 + sc.rel_error_bound) * (1.0 + kMargin) * (1.0 + kMargin));
  compact(s, [&](index_t a) {
    return sc.scores[a] >= keep_from || s.index[a] < s.protect_first || s.index[a] >= s.n - s.protect_last;
  });
  s.prune_at = std::max(prune_floor(s.d, s.eps), 2 * s.size());
}

void StreamingUniversalSet::protect(index_t first, index_t last) {
  LEVATTN_REQUIRE(first >= 0 && last >= 0, "streaming", "protect takes counts >= 0 of first and last keys, got ", first,
                  ", ", last);
  s_->protect_first = first, s_->protect_last = last;
}

const std::vector<index_t>& StreamingUniversalSet::candidate_indices() const { return s_->index; }
ConstMatrix StreamingUniversalSet::candidate_keys() const { return s_->key_rows(); }
ConstMatrix StreamingUniversalSet::candidate_values() const {
  return {s_->values.data(), s_->dv > 0 ? s_->size() : 0, s_->dv};
}
std::vector<double> StreamingUniversalSet::gram() const { return s_->gram.gram(); }

UniversalSet StreamingUniversalSet::universal_set() const {
  const State& s = *s_;
  if (s.n == 0) {
    UniversalSet u;
    return u;
  }
  const KeyGram g = gram_of(s);
  const LeverageScores sc = candidate_scores(s, g);
  UniversalSet u = levattn::universal_set(sc, s.eps);
  for (index_t& j : u.indices) j = s.index[j];
  // As offline over all n keys: sum_bound is rank there too (0 only when every score is 0).
  const double gam = 1.0 + sc.rel_error_bound;
  u.n = s.n;
  u.size_bound = std::floor(std::min(static_cast<double>(s.n), sc.sum_bound * gam * gam / s.eps));
  return u;
}

HeavyEntries StreamingUniversalSet::heavy_entries(ConstMatrix Q) const {
  const State& s = *s_;
  LEVATTN_REQUIRE(Q.cols == s.d, "queries", "expected ", s.d, " columns (the keys' dimension), got ", Q.cols);
  detail::require_finite_matrix(Q, "queries");
  LEVATTN_REQUIRE(s.options.ridge == 0.0, "streaming heavy entries",
                  "need ridge 0 (ridge scores are below the x^2 sensitivities, so their set can miss heavy entries)");
  const UniversalSet u = universal_set();
  const std::vector<double> M = s.gram.gram();
  const index_t d = s.d;
  double trace = 0.0;
  for (index_t x = 0; x < d; ++x) trace += M[x * d + x];
  // q^T M q carries an error of at most about d u trace(M) |q|^2 (M is PSD).
  const double zero_tol = 4.0 * static_cast<double>(d) * std::numeric_limits<double>::epsilon() * trace;
  const std::vector<index_t> at = candidate_rows(s, u.indices);
  HeavyEntries out;
  out.universal_size = static_cast<index_t>(u.indices.size());
  out.rank = u.rank;
  out.normaliser = "exact (q^T M q, M streamed)";
  std::vector<double> q(static_cast<std::size_t>(d)), Mq(static_cast<std::size_t>(d));
  for (index_t i = 0; i < Q.rows; ++i) {
    double qq = 0.0;
    for (index_t x = 0; x < d; ++x) q[x] = Q(i, x), qq += q[x] * q[x];
    detail::dgemm_abt(1, d, d, 1.0, q.data(), d, M.data(), d, 0.0, Mq.data(), d);
    double z = 0.0;
    for (index_t x = 0; x < d; ++x) z += q[x] * Mq[x];
    if (z <= zero_tol * qq) {
      out.zero_rows.push_back(i);
      continue;
    }
    for (std::size_t a = 0; a < at.size(); ++a) {
      const float* k = s.keys.data() + at[a] * d;
      double dot = 0.0;
      for (index_t x = 0; x < d; ++x) dot += q[x] * k[x];
      const double v = dot * dot / z;
      if (v >= s.eps) out.entries.push_back({i, u.indices[a], v});
    }
  }
  return out;
}

std::vector<float> StreamingUniversalSet::attention(ConstMatrix Q, const KernelOptions& kernel) const {
  const State& s = *s_;
  LEVATTN_REQUIRE(s.dv != 0, "streaming attention", "the stream holds no values (dv = 0)");
  LEVATTN_REQUIRE(s.n != 0, "streaming attention", "no keys pushed yet");
  const UniversalSet u = universal_set();
  const index_t size = static_cast<index_t>(u.indices.size());
  if (size == 0) {  // every key is 0: no key has weight
    LEVATTN_REQUIRE(Q.cols == s.d, "queries", "expected ", s.d, " columns");
    return std::vector<float>(static_cast<std::size_t>(Q.rows * s.dv), 0.0f);
  }
  std::vector<float> k(static_cast<std::size_t>(size * s.d)), v(static_cast<std::size_t>(size * s.dv));
  const std::vector<index_t> at = candidate_rows(s, u.indices);
  for (index_t a = 0; a < size; ++a) {
    const index_t c = at[a];
    std::copy_n(s.keys.data() + c * s.d, s.d, k.data() + a * s.d);
    std::copy_n(s.values.data() + c * s.dv, s.dv, v.data() + a * s.dv);
  }
  AttentionOptions o;  // full attention over the kept keys, with the call's kernel
  static_cast<KernelOptions&>(o) = kernel;
  return levattn::attention(Q, ConstMatrix{k.data(), size, s.d}, ConstMatrix{v.data(), size, s.dv}, o);
}

// ---------------------------------------------------------------------------------------------
// State file: magic, version, sizes, options, M's stream, the candidates, CRC-32 of all before.

namespace {

constexpr char kMagic[8] = {'L', 'V', 'S', 'T', 'R', 'E', 'A', 'M'};
constexpr std::uint32_t kVersion = 2;
constexpr std::size_t kHeaderBytes = 8 + 4 + 4 + 10 * 8 + 3 * 8 + 8;

void append_f64(std::vector<std::uint8_t>& out, double x) {
  std::uint64_t u;
  std::memcpy(&u, &x, sizeof u);
  detail::append_le64(out, u);
}
double load_f64(const std::uint8_t* p) {
  const std::uint64_t u = detail::load_le64(p);
  double x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}
template <class T>
void append_all(std::vector<std::uint8_t>& out, const std::vector<T>& v) {
  for (T x : v) {
    if constexpr (std::is_same_v<T, float>) {
      std::uint32_t u;
      std::memcpy(&u, &x, sizeof u);
      detail::append_le32(out, u);
    } else if constexpr (std::is_same_v<T, double>) {
      append_f64(out, x);
    } else {
      detail::append_le64(out, static_cast<std::uint64_t>(x));
    }
  }
}
template <class T>
std::vector<T> load_all(const std::uint8_t*& p, std::size_t count) {
  std::vector<T> v(count);
  for (T& x : v) {
    if constexpr (std::is_same_v<T, float>) {
      const std::uint32_t u = detail::load_le32(p);
      std::memcpy(&x, &u, sizeof x);
      p += 4;
    } else if constexpr (std::is_same_v<T, double>) {
      x = load_f64(p);
      p += 8;
    } else {
      x = static_cast<T>(detail::load_le64(p));
      p += 8;
    }
  }
  return v;
}

std::uint32_t crc_of(const std::uint8_t* data, std::size_t size) {
  uLong crc = crc32(0L, Z_NULL, 0);
  for (std::size_t at = 0; at < size;) {  // zlib takes 32-bit lengths
    const auto step = static_cast<uInt>(std::min<std::size_t>(size - at, std::size_t(1) << 30));
    crc = crc32(crc, data + at, step);
    at += step;
  }
  return static_cast<std::uint32_t>(crc);
}

}  // namespace

void StreamingUniversalSet::save(const std::filesystem::path& path) const {
  const State& s = *s_;
  std::vector<std::uint8_t> out;
  out.reserve(kHeaderBytes + 4 + s.bytes() + 64);
  out.insert(out.end(), kMagic, kMagic + 8);
  detail::append_le32(out, kVersion);
  detail::append_le32(out, 0);
  for (index_t x : {s.d, s.dv, s.n, s.gram.blocks, s.gram.partials(),
                    static_cast<index_t>(s.gram.pending.size()) / s.d, s.size(), s.prune_at, s.protect_first,
                    s.protect_last})
    detail::append_le64(out, static_cast<std::uint64_t>(x));
  append_f64(out, s.eps);
  append_f64(out, s.options.ridge);
  append_f64(out, s.options.rank_rtol);
  detail::append_le64(out, static_cast<std::uint64_t>(s.peak));
  append_all(out, s.gram.part);
  append_all(out, s.gram.pending);
  append_all(out, s.index);
  append_all(out, s.keys);
  append_all(out, s.values);
  detail::append_le32(out, crc_of(out.data(), out.size()));
  const std::span<const std::uint8_t> pieces[] = {out};
  detail::write_file_atomically(path, pieces);
}

StreamingUniversalSet StreamingUniversalSet::load(const std::filesystem::path& path) {
  // The header first: nothing is read or allocated in proportion to what it claims until the
  // sizes agree with the file's length.
  const detail::InputFile file(path, path.string());
  const std::uint64_t length = file.size();
  LEVATTN_REQUIRE_FILE(!(length < kHeaderBytes + 4), path.string(), "truncated: ", length,
                       " bytes, shorter than a state header");
  std::vector<std::uint8_t> head(kHeaderBytes);
  file.read_at(0, head);
  const std::uint8_t* p = head.data();
  LEVATTN_REQUIRE_FILE(std::memcmp(p, kMagic, 8) == 0, path.string(), "not a levattn stream state (magic)");
  const std::uint32_t version = detail::load_le32(p + 8);
  LEVATTN_REQUIRE_FILE(version == kVersion, path.string(), "version: expected ", kVersion, ", got ", version);
  p += 16;
  index_t f[10];
  for (index_t& x : f) x = static_cast<index_t>(detail::load_le64(p)), p += 8;
  const auto [d, dv, n, blocks, partials, pending, size, prune_at, protect_first, protect_last] = f;
  const double eps = load_f64(p), ridge = load_f64(p + 8), rtol = load_f64(p + 16);
  const auto peak = static_cast<std::size_t>(detail::load_le64(p + 24));
  LEVATTN_REQUIRE_FILE(d >= 1 && d <= kMaxDim && dv >= 0 && dv <= kMaxDim, path.string(), "d / dv: out of range");
  LEVATTN_REQUIRE_FILE(n >= 0 && blocks >= 0 && blocks <= n / detail::kGramRows && pending >= 0 &&
                           pending < detail::kGramRows && n - blocks * detail::kGramRows == pending,
                       path.string(), "n: does not match the Gram's blocks and waiting rows");
  LEVATTN_REQUIRE_FILE(partials == detail::gram_partials(d), path.string(), "partials: expected ",
                       detail::gram_partials(d));
  LEVATTN_REQUIRE_FILE(size >= 0 && size <= n, path.string(), "candidates: out of range");
  LEVATTN_REQUIRE_FILE(prune_at >= prune_floor(d, eps) &&
                           prune_at <= std::max(prune_floor(d, eps), 2 * size + 2 * detail::kGramRows),
                       path.string(), "prune_at: out of range");
  LEVATTN_REQUIRE_FILE(eps > 0.0 && eps <= 1.0, path.string(), "eps: expected a number in (0, 1]");
  LEVATTN_REQUIRE_FILE(protect_first >= 0 && protect_last >= 0, path.string(), "protected keys: expected counts >= 0");
  LEVATTN_REQUIRE_FILE(ridge >= 0.0 && std::isfinite(ridge) && rtol >= 0.0 && rtol < 1.0, path.string(),
                       "ridge / rank_rtol: out of range");
  // The length the sizes imply, each part bounded by the file's length before it is added.
  std::uint64_t expected = kHeaderBytes + 4;
  const auto part = [&](std::uint64_t count, std::uint64_t width) {
    LEVATTN_REQUIRE_FILE(count <= length / width && expected <= length - count * width, path.string(),
                         "truncated or lying sizes: the header implies more than the file's ", length, " bytes");
    expected += count * width;
  };
  const auto D = static_cast<std::uint64_t>(d), DV = static_cast<std::uint64_t>(dv), C = static_cast<std::uint64_t>(size);
  part(static_cast<std::uint64_t>(partials) * D, 8 * D);
  part(static_cast<std::uint64_t>(pending), 4 * D);
  part(C, 8);
  part(C, 4 * D);
  part(C * DV, 4);
  LEVATTN_REQUIRE_FILE(length == expected, path.string(), "truncated or padded: ", length,
                       " bytes, the header implies ", expected);
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(length));
  file.read_at(0, bytes);
  LEVATTN_REQUIRE_FILE(detail::load_le32(bytes.data() + bytes.size() - 4) == crc_of(bytes.data(), bytes.size() - 4),
                       path.string(), "checksum: the contents do not match their CRC-32 (corrupted)");
  LeverageOptions o;
  o.ridge = ridge, o.rank_rtol = rtol;
  StreamingUniversalSet out(d, dv, eps, o);
  State& s = *out.s_;
  s.n = n, s.prune_at = prune_at, s.peak = peak;
  s.protect_first = protect_first, s.protect_last = protect_last;
  s.gram.blocks = blocks;
  p = bytes.data() + kHeaderBytes;
  s.gram.part = load_all<double>(p, static_cast<std::size_t>(partials * d * d));
  s.gram.pending = load_all<float>(p, static_cast<std::size_t>(pending * d));
  s.gram.pending.reserve(static_cast<std::size_t>(detail::kGramRows * d));
  s.index = load_all<index_t>(p, static_cast<std::size_t>(size));
  s.keys = load_all<float>(p, static_cast<std::size_t>(size * d));
  s.values = load_all<float>(p, static_cast<std::size_t>(size * dv));
  for (std::size_t a = 0; a < s.index.size(); ++a)
    LEVATTN_REQUIRE_FILE(s.index[a] >= 0 && s.index[a] < n && (a == 0 || s.index[a] > s.index[a - 1]), path.string(),
                         "candidates: indices not ascending in [0, n)");
  return out;
}

}  // namespace levattn
