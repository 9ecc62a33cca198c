// The KV cache: one StreamingUniversalSet per (batch, kv head), pruned on a fixed token
// schedule with its sinks and window protected; attention over the kept rows in place.
#include "levattn/kv_cache.hpp"

#include <algorithm>
#include <cmath>

#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/streaming.hpp"

namespace levattn {

struct KVCache::Impl {
  index_t batch = 0, heads = 0, d = 0, dv = 0, tokens = 0;
  KVCacheOptions o;
  std::vector<StreamingUniversalSet> streams;  // b * heads + h
  std::vector<std::vector<float>> all_k, all_v;  // keep_full: every key and value
  index_t pairs() const { return batch * heads; }
};

namespace {

void check_cache_shape(const Tensor4Ref& t, index_t batch, index_t heads, index_t cols, const char* name) {
  LEVATTN_REQUIRE(!(t.batch != batch || t.heads != heads || t.cols != cols || t.rows < 0 || (t.rows > 0 && !t.data)),
                  name, "expected (batch, kv_heads, t, ", cols, ") = (", batch, ", ", heads, ", t, ", cols, "), got (",
                  t.batch, ", ", t.heads, ", ", t.rows, ", ", t.cols, ")");
}

// f(scale q.k) of the call's kernel, in float64 (its normaliser's terms).
double kernel_weight(const KernelOptions& o, double s, double shift) {
  return o.kernel == Kernel::softmax ? std::exp(s - shift) : std::pow(std::fabs(s), o.p);
}

// The kernel's mass on rows `kept` (ascending indices) of all n keys for query q: sum over kept
// of f(s_j) / sum over all of f(s_j), s_j = scale q.k_j.
double kernel_mass(const KernelOptions& o, double scale, const float* q, const std::vector<float>& K, index_t n,
                   index_t d, const std::vector<index_t>& kept) {
  std::vector<double> s(static_cast<std::size_t>(n));
  double top = -INFINITY;
  for (index_t j = 0; j < n; ++j) {
    double dot = 0.0;
    for (index_t x = 0; x < d; ++x) dot += static_cast<double>(q[x]) * K[j * d + x];
    s[j] = scale * dot;
    top = std::max(top, s[j]);
  }
  double all = 0.0, in = 0.0;
  for (index_t j = 0; j < n; ++j) all += kernel_weight(o, s[j], top);
  for (index_t j : kept) in += kernel_weight(o, s[j], top);
  return all > 0.0 ? in / all : 1.0;
}

// sum over the kept keys of (q.k)^2 / q^T M q (1 when q^T M q is 0).
double x2_mass(const float* q, ConstMatrix kept, const std::vector<double>& M) {
  const index_t d = kept.cols;
  double in = 0.0, all = 0.0;
  for (index_t a = 0; a < kept.rows; ++a) {
    double dot = 0.0;
    for (index_t x = 0; x < d; ++x) dot += static_cast<double>(q[x]) * kept(a, x);
    in += dot * dot;
  }
  for (index_t x = 0; x < d; ++x) {
    double row = 0.0;
    for (index_t y = 0; y < d; ++y) row += M[x * d + y] * q[y];
    all += row * q[x];
  }
  return all > 0.0 ? std::min(1.0, in / all) : 1.0;
}

}  // namespace

KVCache::KVCache(index_t batch, index_t kv_heads, index_t d, index_t dv, const KVCacheOptions& o)
    : p_(std::make_unique<Impl>()) {
  LEVATTN_REQUIRE(batch >= 1 && kv_heads >= 1 && d >= 1 && dv >= 1, "kv cache",
                  "expected batch, kv_heads, d and dv >= 1, got ", batch, ", ", kv_heads, ", ", d, ", ", dv);
  LEVATTN_REQUIRE(o.window >= 0 && o.sinks >= 0 && o.prune_every >= 1 && o.prune_every <= kMaxPruneEvery, "kv cache",
                  "expected window >= 0, sinks >= 0 and 1 <= prune_every <= ", kMaxPruneEvery, ", got ", o.window, ", ",
                  o.sinks, ", ", o.prune_every);
  LEVATTN_REQUIRE(o.leverage.ridge == 0.0, "kv cache",
                  "needs ridge 0 (ridge scores are below the x^2 sensitivities, so it could evict a heavy key)");
  Impl& p = *p_;
  p.batch = batch, p.heads = kv_heads, p.d = d, p.dv = dv, p.o = o;
  p.streams.reserve(static_cast<std::size_t>(checked_elements({batch, kv_heads}, "kv cache heads")));
  for (index_t h = 0; h < p.pairs(); ++h) {
    p.streams.emplace_back(d, dv, o.eps, o.leverage);
    p.streams.back().protect(o.sinks, o.window);
  }
  if (o.keep_full) p.all_k.resize(p.streams.size()), p.all_v.resize(p.streams.size());
}

KVCache::~KVCache() = default;
KVCache::KVCache(KVCache&&) noexcept = default;
KVCache& KVCache::operator=(KVCache&&) noexcept = default;

index_t KVCache::tokens() const { return p_->tokens; }
index_t KVCache::batch() const { return p_->batch; }
index_t KVCache::kv_heads() const { return p_->heads; }
index_t KVCache::d() const { return p_->d; }
index_t KVCache::dv() const { return p_->dv; }

const std::vector<index_t>& KVCache::kept(index_t b, index_t h) const {
  LEVATTN_REQUIRE(b >= 0 && b < p_->batch && h >= 0 && h < p_->heads, "kv cache", "(batch, head) (", b, ", ", h,
                  ") out of range");
  return p_->streams[static_cast<std::size_t>(b * p_->heads + h)].candidate_indices();
}

std::size_t KVCache::bytes() const {
  std::size_t total = 0;
  for (const auto& s : p_->streams) total += s.workspace_bytes();
  for (const auto& v : p_->all_k) total += v.capacity() * sizeof(float);
  for (const auto& v : p_->all_v) total += v.capacity() * sizeof(float);
  return total;
}

void KVCache::append(const Tensor4Ref& keys, const Tensor4Ref& values) {
  Impl& p = *p_;
  check_cache_shape(keys, p.batch, p.heads, p.d, "keys");
  check_cache_shape(values, p.batch, p.heads, p.dv, "values");
  LEVATTN_REQUIRE(values.rows == keys.rows, "values", "expected ", keys.rows, " tokens (one per key), got ",
                  values.rows);
  const index_t t = keys.rows;
  if (t == 0) return;
  // Checked whole first, so that no head takes a block another head refuses.
  detail::require_finite_matrix({keys.data, p.pairs() * t, p.d}, "keys");
  detail::require_finite_matrix({values.data, p.pairs() * t, p.dv}, "values");
  for (index_t r0 = 0; r0 < t;) {
    // Up to the next multiple of prune_every: the schedule depends on token counts alone.
    const index_t take = std::min(t - r0, p.o.prune_every - p.tokens % p.o.prune_every);
    const bool prune = (p.tokens + take) % p.o.prune_every == 0;
    const double flops = static_cast<double>(p.pairs() * take) * static_cast<double>(p.d * p.d) * 2.0;
    detail::parallel_tasks(p.pairs(), flops, [] { return 0; }, [&](index_t h, int&) {
      const ConstMatrix k = keys.slice(h / p.heads, h % p.heads), v = values.slice(h / p.heads, h % p.heads);
      StreamingUniversalSet& s = p.streams[h];
      s.push(ConstMatrix{k.row(r0), take, p.d}, ConstMatrix{v.row(r0), take, p.dv});
      if (prune) s.prune();
      if (p.o.keep_full) {
        p.all_k[h].insert(p.all_k[h].end(), k.row(r0), k.row(r0) + take * p.d);
        p.all_v[h].insert(p.all_v[h].end(), v.row(r0), v.row(r0) + take * p.dv);
      }
    });
    p.tokens += take;
    r0 += take;
  }
}

KVCacheReport KVCache::attend(const Tensor4Ref& queries, float* out, const KernelOptions& kernel,
                              bool report_mass) const {
  const Impl& p = *p_;
  LEVATTN_REQUIRE(!(queries.batch != p.batch || queries.heads < 1 || queries.heads % p.heads != 0 ||
                    queries.cols != p.d || queries.rows < 1 || !queries.data),
                  "queries", "expected (batch, q_heads, tq, d) = (", p.batch, ", a multiple of ", p.heads,
                  ", tq >= 1, ", p.d, "), got (", queries.batch, ", ", queries.heads, ", ", queries.rows, ", ",
                  queries.cols, ")");
  LEVATTN_REQUIRE(out, "kv cache", "null output buffer");
  LEVATTN_REQUIRE(p.tokens != 0, "kv cache", "attend before any token was appended");
  const index_t group = queries.heads / p.heads, tq = queries.rows, rows = group * tq;
  detail::require_finite_matrix({queries.data, p.batch * queries.heads * tq, p.d}, "queries");
  AttentionOptions o;  // full attention over the kept keys, with the call's kernel
  static_cast<KernelOptions&>(o) = kernel;
  const double scale = logit_scale(o, p.d);
  KVCacheReport rep;
  rep.kept.resize(static_cast<std::size_t>(p.pairs()));
  if (report_mass) {
    rep.x2_mass.resize(static_cast<std::size_t>(p.batch * queries.heads * tq));
    if (p.o.keep_full) rep.kernel_mass.resize(rep.x2_mass.size());
  }
  double kept_total = 0.0;
  for (const auto& s : p.streams) kept_total += static_cast<double>(s.candidates());
  const double flops = 2.0 * static_cast<double>(rows * (p.d + p.dv)) * kept_total;
  // The query heads of kv head h are consecutive: (rows x d) from query head h * group on.
  detail::parallel_tasks(p.pairs(), flops, [] { return 0; }, [&](index_t h, int&) {
    const StreamingUniversalSet& s = p.streams[h];
    const index_t first = h * rows;  // = (b * q_heads + (h % heads) * group) * tq
    const ConstMatrix Q{queries.data + first * p.d, rows, p.d};
    if (s.candidates() == 0) {  // every key evicted (all zero) and nothing protected: no weight anywhere
      std::fill_n(out + first * p.dv, rows * p.dv, 0.0f);
    } else {
      const std::vector<float> o_h = attention(Q, s.candidate_keys(), s.candidate_values(), o);
      std::copy(o_h.begin(), o_h.end(), out + first * p.dv);
    }
    rep.kept[h] = s.candidates();
    if (!report_mass) return;
    const std::vector<double> M = s.gram();
    for (index_t r = 0; r < rows; ++r) {
      rep.x2_mass[first + r] = x2_mass(Q.row(r), s.candidate_keys(), M);
      if (p.o.keep_full)
        rep.kernel_mass[first + r] = kernel_mass(o, scale, Q.row(r), p.all_k[h], p.tokens, p.d, s.candidate_indices());
    }
  });
  return rep;
}

}  // namespace levattn
