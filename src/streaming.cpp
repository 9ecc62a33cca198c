// The streaming x^2 universal set (docs/design.md, "Streaming"): the key Gram as fixed-order
// partial sums, candidates pruned by their prefix scores, and a checksummed state file.
#include "levattn/streaming.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "detail/gram.hpp"
#include "levattn/attention.hpp"
#include "leverage.hpp"
#include "levattn/io.hpp"
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
// State file: an .npz archive (numpy.load reads it) of named members; the zip's CRC-32 of each
// member guards its bytes.
//
//   version                int64 (1,)            kStateVersion
//   eps, ridge, rank_rtol  float64 (1,) each     the set's eps and the leverage options
//   n, gram_blocks, prune_at, protect_first, protect_last, peak_workspace_bytes   int64 (1,) each
//   gram_partials          float64 (partials, d, d)   the streamed Gram's partial sums
//   gram_pending           float32 (pending, d)       keys waiting for the next Gram block
//   index                  int64 (size,)              the candidates' key indices, ascending
//   keys, values           float32 (size, d), (size, dv)

namespace {

constexpr std::int64_t kStateVersion = 3;
// The first bytes of a version-2 state (a binary file), which this version no longer reads.
constexpr char kBinaryMagic[8] = {'L', 'V', 'S', 'T', 'R', 'E', 'A', 'M'};

Array one_int(index_t x) { return Array::from_int64({1}, {static_cast<std::int64_t>(x)}); }
Array one_double(double x) { return Array::from_float64({1}, {x}); }

// The named members of a state archive, each checked for its dtype and number of dimensions.
class StateMembers {
 public:
  StateMembers(std::vector<std::pair<std::string, Array>> members, std::string where)
      : members_(std::move(members)), where_(std::move(where)) {}

  const Array& get(const char* name, DType dtype, std::size_t dims) const {
    const auto it = std::find_if(members_.begin(), members_.end(), [&](const auto& m) { return m.first == name; });
    LEVATTN_REQUIRE_FILE(it != members_.end(), where_, "member '", name, "': missing (not a levattn stream state?)");
    const Array& a = it->second;
    LEVATTN_REQUIRE_FILE(a.dtype == dtype && a.shape.size() == dims, where_, "member '", name, "': expected a ",
                         dims, "-D ", to_string(dtype), " array, got a ", a.shape.size(), "-D ", to_string(a.dtype));
    return a;
  }
  index_t integer(const char* name) const {
    const Array& a = get(name, DType::int64, 1);
    LEVATTN_REQUIRE_FILE(a.shape[0] == 1, where_, "member '", name, "': expected one value, got ", a.shape[0]);
    return a.i64[0];
  }
  double number(const char* name) const {
    const Array& a = get(name, DType::float64, 1);
    LEVATTN_REQUIRE_FILE(a.shape[0] == 1, where_, "member '", name, "': expected one value, got ", a.shape[0]);
    return a.f64[0];
  }
  // A (rows, cols) or (count, cols, cols) member whose trailing dimensions are `cols`.
  const Array& rows_of(const char* name, DType dtype, index_t cols, std::size_t dims = 2) const {
    const Array& a = get(name, dtype, dims);
    for (std::size_t k = 1; k < dims; ++k)
      LEVATTN_REQUIRE_FILE(a.shape[k] == cols, where_, "member '", name, "': expected ", cols, " columns, got ",
                           a.shape[k]);
    return a;
  }

 private:
  std::vector<std::pair<std::string, Array>> members_;
  std::string where_;
};

// The first 8 bytes of a file (fewer if it is shorter).
std::string first_bytes(const std::filesystem::path& path) {
  const detail::InputFile file(path, path.string());
  std::vector<std::uint8_t> head(static_cast<std::size_t>(std::min<std::uint64_t>(8, file.size())));
  file.read_at(0, head);
  return std::string(head.begin(), head.end());
}

}  // namespace

void StreamingUniversalSet::save(const std::filesystem::path& path) const {
  const State& s = *s_;
  const index_t partials = s.gram.partials(), pending = static_cast<index_t>(s.gram.pending.size()) / s.d;
  write_npz(path, {{"version", one_int(kStateVersion)},
                   {"eps", one_double(s.eps)},
                   {"ridge", one_double(s.options.ridge)},
                   {"rank_rtol", one_double(s.options.rank_rtol)},
                   {"n", one_int(s.n)},
                   {"gram_blocks", one_int(s.gram.blocks)},
                   {"prune_at", one_int(s.prune_at)},
                   {"protect_first", one_int(s.protect_first)},
                   {"protect_last", one_int(s.protect_last)},
                   {"peak_workspace_bytes", one_int(static_cast<index_t>(s.peak))},
                   {"gram_partials", Array::from_float64({partials, s.d, s.d}, s.gram.part)},
                   {"gram_pending", Array::from_float32({pending, s.d}, s.gram.pending)},
                   {"index", Array::from_int64({s.size()}, std::vector<std::int64_t>(s.index.begin(), s.index.end()))},
                   {"keys", Array::from_float32({s.size(), s.d}, s.keys)},
                   {"values", Array::from_float32({s.size(), s.dv}, s.values)}});
}

StreamingUniversalSet StreamingUniversalSet::load(const std::filesystem::path& path) {
  const std::string where = path.string();
  LEVATTN_REQUIRE_FILE(first_bytes(path) != std::string(kBinaryMagic, 8), where,
                       "a version-2 binary stream state, which this levattn no longer reads (states are .npz "
                       "archives from version 3 on); run the stream again");
  const StateMembers a(read_npz(path), where);
  const index_t version = a.integer("version");
  LEVATTN_REQUIRE_FILE(version == kStateVersion, where, "version: expected ", kStateVersion, ", got ", version);
  const double eps = a.number("eps"), ridge = a.number("ridge"), rtol = a.number("rank_rtol");
  const index_t n = a.integer("n"), blocks = a.integer("gram_blocks"), prune_at = a.integer("prune_at");
  const index_t protect_first = a.integer("protect_first"), protect_last = a.integer("protect_last");
  const index_t peak = a.integer("peak_workspace_bytes");
  const Array& keys = a.get("keys", DType::float32, 2);
  const index_t d = keys.shape[1], size = keys.shape[0];
  LEVATTN_REQUIRE_FILE(d >= 1 && d <= kMaxDim, where, "member 'keys': expected 1 to 2^20 columns, got ", d);
  const Array& values = a.get("values", DType::float32, 2);
  const index_t dv = values.shape[1];
  LEVATTN_REQUIRE_FILE(values.shape[0] == size && dv <= kMaxDim, where, "member 'values': expected ", size,
                       " rows (one per kept key) and at most 2^20 columns, got (", values.shape[0], ", ", dv, ")");
  const Array& index = a.get("index", DType::int64, 1);
  LEVATTN_REQUIRE_FILE(index.shape[0] == size, where, "member 'index': expected ", size, " entries (one per kept key)");
  const Array& partials = a.rows_of("gram_partials", DType::float64, d, 3);
  const Array& pending = a.rows_of("gram_pending", DType::float32, d);
  LEVATTN_REQUIRE_FILE(partials.shape[0] == detail::gram_partials(d), where, "member 'gram_partials': expected ",
                       detail::gram_partials(d), " partial sums, got ", partials.shape[0]);
  LEVATTN_REQUIRE_FILE(n >= 0 && blocks >= 0 && blocks <= n / detail::kGramRows && pending.shape[0] < detail::kGramRows &&
                           n - blocks * detail::kGramRows == pending.shape[0],
                       where, "n: does not match the Gram's blocks and waiting rows");
  LEVATTN_REQUIRE_FILE(size <= n, where, "candidates: more than the n = ", n, " keys pushed");
  LEVATTN_REQUIRE_FILE(eps > 0.0 && eps <= 1.0, where, "eps: expected a number in (0, 1]");
  LEVATTN_REQUIRE_FILE(prune_at >= prune_floor(d, eps) &&
                           prune_at <= std::max(prune_floor(d, eps), 2 * size + 2 * detail::kGramRows),
                       where, "prune_at: out of range");
  LEVATTN_REQUIRE_FILE(protect_first >= 0 && protect_last >= 0, where, "protected keys: expected counts >= 0");
  LEVATTN_REQUIRE_FILE(ridge >= 0.0 && std::isfinite(ridge) && rtol >= 0.0 && rtol < 1.0, where,
                       "ridge / rank_rtol: out of range");
  LEVATTN_REQUIRE_FILE(peak >= 0, where, "peak_workspace_bytes: expected a count >= 0");
  for (std::size_t k = 0; k < index.i64.size(); ++k)
    LEVATTN_REQUIRE_FILE(index.i64[k] >= 0 && index.i64[k] < n && (k == 0 || index.i64[k] > index.i64[k - 1]), where,
                         "candidates: indices not ascending in [0, n)");
  // Keys pushed are finite (push refuses NaN and Inf), so is every sum of their products.
  const auto finite = [](const auto& v) { return std::all_of(v.begin(), v.end(), [](auto x) { return std::isfinite(x); }); };
  LEVATTN_REQUIRE_FILE(finite(keys.f32) && finite(values.f32) && finite(pending.f32) && finite(partials.f64), where,
                       "keys, values, gram_pending, gram_partials: expected finite values");
  LeverageOptions o;
  o.ridge = ridge, o.rank_rtol = rtol;
  StreamingUniversalSet out(d, dv, eps, o);
  State& s = *out.s_;
  s.n = n, s.prune_at = prune_at, s.peak = static_cast<std::size_t>(peak);
  s.protect_first = protect_first, s.protect_last = protect_last;
  s.gram.blocks = blocks;
  s.gram.part = partials.f64;
  s.gram.pending = pending.f32;
  s.gram.pending.reserve(static_cast<std::size_t>(detail::kGramRows * d));
  s.index.assign(index.i64.begin(), index.i64.end());
  s.keys = keys.f32;
  s.values = values.f32;
  const std::vector<double> m = out.gram();  // the partials' sum, which can overflow even so
  LEVATTN_REQUIRE_FILE(finite(m), where, "gram_partials: their sum K^T K is not finite");
  return out;
}

}  // namespace levattn
