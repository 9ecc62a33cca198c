// Exact heavy entries of x^2 attention (docs/design.md): Z_i = q_i^T M q_i, then only keys of U_eps.
#include "levattn/heavy_entries.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "detail/blas.hpp"
#include "heavy_search.hpp"
#include "detail/lapack.hpp"
#include "detail/names.hpp"
#include "leverage.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "detail/rng.hpp"
#include "levattn/causal.hpp"
#include "levattn/lewis_weights.hpp"
#include "levattn/universal_set.hpp"

namespace levattn {

namespace {

constexpr std::pair<Normaliser, const char*> kNormaliserNames[] = {{Normaliser::exact, "exact"},
                                                                   {Normaliser::sampled, "sampled"}};

constexpr std::pair<HeavySearch, const char*> kHeavySearchNames[] = {{HeavySearch::exact, "exact"},
                                                                     {HeavySearch::countsketch, "countsketch"}};

}  // namespace

std::string to_string(Normaliser normaliser) { return detail::name_of(kNormaliserNames, normaliser); }
Normaliser parse_normaliser(const std::string& name) { return detail::parse_name(kNormaliserNames, name, "normaliser"); }
std::string to_string(HeavySearch search) { return detail::name_of(kHeavySearchNames, search); }
HeavySearch parse_heavy_search(const std::string& name) {
  return detail::parse_name(kHeavySearchNames, name, "search");
}

namespace {

void check_inputs(ConstMatrix Q, ConstMatrix K, double eps) {
  detail::require_eps(eps);
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  LEVATTN_REQUIRE(Q.cols == K.cols, "queries", "expected ", K.cols, " columns (the keys' dimension), got ", Q.cols);
}

// Concatenates the per-block results in block order: entries sorted by query, then key.
void merge_blocks(const std::vector<std::vector<HeavyEntry>>& found,
                  const std::vector<std::vector<index_t>>& zeros, HeavyEntries& out) {
  for (std::size_t b = 0; b < found.size(); ++b) {
    out.entries.insert(out.entries.end(), found[b].begin(), found[b].end());
    out.zero_rows.insert(out.zero_rows.end(), zeros[b].begin(), zeros[b].end());
  }
}

// Rows r0 .. r0 + rows - 1 of A in float64 (rows x cols, contiguous), so that dot products with
// them are not the accuracy bottleneck.
void rows_to_double(ConstMatrix A, index_t r0, index_t rows, std::vector<double>& out) {
  out.resize(static_cast<std::size_t>(rows * A.cols));
  for (index_t i = 0; i < rows; ++i)
    for (index_t j = 0; j < A.cols; ++j) out[i * A.cols + j] = A(r0 + i, j);
}

// The keys of U in float64 (|U| x d).
std::vector<double> universal_keys(ConstMatrix K, const UniversalSet& U) {
  const index_t u = static_cast<index_t>(U.indices.size()), d = K.cols;
  std::vector<double> KU(static_cast<std::size_t>(u * d));
  for (index_t a = 0; a < u; ++a)
    for (index_t j = 0; j < d; ++j) KU[a * d + j] = K(U.indices[a], j);
  return KU;
}

}  // namespace

namespace detail {

double x2_zero_tol(index_t n, index_t d, const std::vector<double>& gram) {
  double frob2 = 0.0;  // ||K||_F^2 = trace(K^T K)
  for (index_t i = 0; i < d; ++i) frob2 += gram[i * d + i];
  // ||R q|| carries an error of at most n d u ||K||_F ||q|| (Householder QR, Higham Thm 19.4).
  const double res = static_cast<double>(n) * static_cast<double>(d) * std::numeric_limits<double>::epsilon() / 2;
  return res * res * frob2;
}

void x2_entries(ConstMatrix Q, index_t query_offset, const std::vector<double>& R, const std::vector<double>& KU,
                const std::vector<index_t>& keys, double eps, double zero_tol, HeavyEntries& out) {
  const index_t m = Q.rows, d = Q.cols, u = static_cast<index_t>(keys.size());
  constexpr index_t kRows = 256;
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<std::vector<HeavyEntry>> found(static_cast<std::size_t>(blocks));
  std::vector<std::vector<index_t>> zeros(static_cast<std::size_t>(blocks));
  struct Workspace {
    std::vector<double> q, t, dots;
  };
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(d * (d + u));
  detail::parallel_tasks(blocks, flops, [] { return Workspace{}; }, [&](index_t b, Workspace& w) {
    const index_t r0 = b * kRows, rows = std::min(kRows, m - r0);
    rows_to_double(Q, r0, rows, w.q);
    w.t.resize(static_cast<std::size_t>(rows * d));
    // T = Q_b R^T: row i is R q_i, and Z_i = ||R q_i||^2 = sum_l (q_i.k_l)^2, a sum of squares.
    detail::dgemm_abt(rows, d, d, 1.0, w.q.data(), d, R.data(), d, 0.0, w.t.data(), d);
    if (u > 0) {
      w.dots.resize(static_cast<std::size_t>(rows * u));
      detail::dgemm_abt(rows, u, d, 1.0, w.q.data(), d, KU.data(), d, 0.0, w.dots.data(), u);
    }
    for (index_t i = 0; i < rows; ++i) {
      double z = 0.0, qq = 0.0;
      for (index_t j = 0; j < d; ++j) {
        z += w.t[i * d + j] * w.t[i * d + j];
        qq += w.q[i * d + j] * w.q[i * d + j];
      }
      if (z <= zero_tol * qq) {
        zeros[b].push_back(query_offset + r0 + i);
        continue;
      }
      for (index_t a = 0; a < u; ++a) {
        const double x = w.dots[i * u + a];
        const double v = x * x / z;
        if (v >= eps) found[b].push_back({query_offset + r0 + i, keys[a], v});
      }
    }
  });
  merge_blocks(found, zeros, out);
}

void x2_entries_sketched(ConstMatrix Q, const std::vector<double>& R, const std::vector<double>& KU,
                         const std::vector<index_t>& keys, double eps, double zero_tol, double delta,
                         std::uint64_t seed, std::uint64_t stream, HeavyEntries& out) {
  const index_t m = Q.rows, d = Q.cols, u = static_cast<index_t>(keys.size());
  const auto t = static_cast<index_t>(std::max(1.0, std::ceil(std::log2(static_cast<double>(m) / (eps * delta)))));
  const auto b = static_cast<index_t>(std::ceil(64.0 / eps));
  const index_t tb = checked_elements({t, b}, "countsketch (rows x buckets)");
  out.sketch_rows = t, out.sketch_buckets = b;
  // Each key's bucket and sign per row, and the sketch S K_U (t b x d), key by key in order.
  const CounterRng rng(seed, Purpose::heavy_countsketch, stream);
  std::vector<index_t> slot(static_cast<std::size_t>(t * u));
  std::vector<double> sign(slot.size()), SKU(static_cast<std::size_t>(checked_elements({tb, d}, "countsketch")));
  for (index_t r = 0; r < t; ++r)
    for (index_t a = 0; a < u; ++a) {
      const auto e = static_cast<std::uint64_t>(r * u + a);
      slot[r * u + a] = r * b + static_cast<index_t>(rng.below(2 * e, static_cast<std::uint64_t>(b)));
      sign[r * u + a] = (rng.u64(2 * e + 1) & 1) ? 1.0 : -1.0;
      for (index_t x = 0; x < d; ++x) SKU[slot[r * u + a] * d + x] += sign[r * u + a] * KU[a * d + x];
    }
  // Query blocks small enough that their t b estimates stay near 8 MiB.
  const index_t rows_per_block = std::clamp<index_t>((index_t(1) << 20) / tb, 1, 256);
  const index_t blocks = (m + rows_per_block - 1) / rows_per_block;
  std::vector<std::vector<HeavyEntry>> found(static_cast<std::size_t>(blocks));
  std::vector<std::vector<index_t>> zeros(static_cast<std::size_t>(blocks));
  std::vector<index_t> verified(static_cast<std::size_t>(blocks), 0);
  struct Workspace {
    std::vector<double> q, t, y, est;
  };
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(d * (d + tb) + u * t);
  detail::parallel_tasks(blocks, flops, [] { return Workspace{}; }, [&](index_t blk, Workspace& w) {
    const index_t r0 = blk * rows_per_block, rows = std::min(rows_per_block, m - r0);
    rows_to_double(Q, r0, rows, w.q);
    w.t.resize(static_cast<std::size_t>(rows * d));
    detail::dgemm_abt(rows, d, d, 1.0, w.q.data(), d, R.data(), d, 0.0, w.t.data(), d);
    w.y.resize(static_cast<std::size_t>(rows * tb));
    detail::dgemm_abt(rows, tb, d, 1.0, w.q.data(), d, SKU.data(), d, 0.0, w.y.data(), tb);
    w.est.resize(static_cast<std::size_t>(t));
    for (index_t i = 0; i < rows; ++i) {
      const double* q = w.q.data() + i * d;
      double z = 0.0, qq = 0.0;
      for (index_t j = 0; j < d; ++j) z += w.t[i * d + j] * w.t[i * d + j], qq += q[j] * q[j];
      if (z <= zero_tol * qq) {
        zeros[blk].push_back(r0 + i);
        continue;
      }
      // A heavy key has |x| >= sqrt(eps z), its median estimate within 4 sqrt(z / b) of x.
      const double threshold = std::sqrt(eps * z) - 4.0 * std::sqrt(z / static_cast<double>(b));
      const double* y = w.y.data() + i * tb;
      for (index_t a = 0; a < u; ++a) {
        for (index_t r = 0; r < t; ++r) w.est[r] = sign[r * u + a] * y[slot[r * u + a]];
        std::nth_element(w.est.begin(), w.est.begin() + t / 2, w.est.end());
        if (std::fabs(w.est[t / 2]) < threshold) continue;
        ++verified[blk];
        double x = 0.0;
        for (index_t j = 0; j < d; ++j) x += q[j] * KU[a * d + j];
        if (x * x / z >= eps) found[blk].push_back({r0 + i, keys[a], x * x / z});
      }
    }
  });
  merge_blocks(found, zeros, out);
  for (index_t v : verified) out.candidates += v;
}

}  // namespace detail

namespace {

// Exact x^2 heavy entries: keys of U_eps only, and Z_i = ||R q_i||^2 with K = Q R (header).
HeavyEntries heavy_x2(ConstMatrix Q, ConstMatrix K, double eps, const HeavyOptions& o, std::uint64_t stream) {
  const LeverageOptions& lo = o.leverage;
  check_inputs(Q, K, eps);
  LEVATTN_REQUIRE(lo.method != ScoreMethod::sketch, "method sketch",
                  "exact x^2 normalisers need the exact factor of the keys "
                  "(O(n d^2)), which costs more than a sketch saves; use method exact, or "
                  "sampled normalisers");
  const index_t d = K.cols;
  const KeyGram g = key_gram(K, lo);  // check_options refused a ridge
  const UniversalSet U = universal_set(detail::scores_unchecked(K, g), eps);
  HeavyEntries out;
  out.universal_size = static_cast<index_t>(U.indices.size());
  out.rank = g.rank;
  out.normaliser = detail::kX2Normaliser;
  const double zero_tol = detail::x2_zero_tol(K.rows, d, g.gram);
  if (o.search == HeavySearch::countsketch)
    detail::x2_entries_sketched(Q, detail::key_r_factor(K), universal_keys(K, U), U.indices, eps, zero_tol, o.delta,
                                o.seed, stream, out);
  else
    detail::x2_entries(Q, 0, detail::key_r_factor(K), universal_keys(K, U), U.indices, eps, zero_tol, out);
  return out;
}

// |x|^p with the common exponents multiplied out.
inline double power(double x, double p) {
  const double a = std::fabs(x);
  if (p == 1.0) return a;
  if (p == 2.0) return a * a;
  if (p == 3.0) return a * a * a;
  if (p == 4.0) return (a * a) * (a * a);
  return std::pow(a, p);
}


// The keys the |x|^p normalisers run over: all of K, or r keys drawn with probability t_l / T
// (importance weights 1 / (r pi_l)), in float64 so that Z_i is as accurate as the numerators.
struct NormaliserKeys {
  index_t r = 0;                // keys drawn; 0: every key (exact)
  double gamma = 0.0;           // sampled: stated accuracy
  std::vector<double> keys64;   // (r or n) x d
  std::vector<double> weight;   // per sampled key: 1 / (r pi_l)
};

NormaliserKeys normaliser_keys(ConstMatrix K, const LeverageScores& t, const HeavyOptions& o,
                               index_t m, std::uint64_t stream) {
  const index_t n = K.rows, d = K.cols;
  NormaliserKeys nk;
  double total = 0.0;
  for (double x : t.scores) total += x;
  if (o.normaliser == Normaliser::sampled && total > 0.0) {
    const double logterm = std::log(2.0 * static_cast<double>(m) / o.delta);
    const index_t r = o.samples > 0 ? o.samples
                                    : detail::to_index(std::ceil(3.0 * total * logterm / (o.gamma * o.gamma)));
    if (r < n) {  // else the exact normaliser is cheaper
      nk.r = r;
      nk.gamma = std::sqrt(3.0 * total * logterm / static_cast<double>(r));
      LEVATTN_REQUIRE(!(nk.gamma >= 1.0), "samples", r, " keys give no (1 +- gamma) guarantee (gamma = ", nk.gamma,
                      " >= 1); draw at least ", detail::to_index(std::ceil(3.0 * total * logterm)),
                      " or leave samples at 0");
    }
  }
  if (nk.r == 0) {
    nk.keys64.resize(static_cast<std::size_t>(n * d));
    for (index_t l = 0; l < n; ++l)
      for (index_t j = 0; j < d; ++j) nk.keys64[l * d + j] = K(l, j);
    return nk;
  }
  std::vector<double> cdf(static_cast<std::size_t>(n));
  double acc = 0.0;
  for (index_t l = 0; l < n; ++l) cdf[l] = (acc += t.scores[l]);
  const detail::CounterRng rng(o.seed, detail::Purpose::sampled_normaliser, stream);
  nk.keys64.resize(static_cast<std::size_t>(nk.r * d));
  nk.weight.resize(static_cast<std::size_t>(nk.r));
  for (index_t s = 0; s < nk.r; ++s) {
    const double x = rng.uniform(static_cast<std::uint64_t>(s)) * acc;
    index_t l = static_cast<index_t>(std::upper_bound(cdf.begin(), cdf.end(), x) - cdf.begin());
    l = std::min(l, n - 1);
    while (t.scores[l] <= 0.0 && l > 0) --l;  // never land on a zero-probability key
    for (index_t j = 0; j < d; ++j) nk.keys64[s * d + j] = K(l, j);
    nk.weight[s] = acc / (static_cast<double>(nk.r) * t.scores[l]);
  }
  return nk;
}

// Heavy entries of |x|^p attention (header): U from the sensitivity bounds, Z_i over nk's keys.
HeavyEntries heavy_power(ConstMatrix Q, ConstMatrix K, double eps, const HeavyOptions& o,
                         std::uint64_t stream) {
  check_inputs(Q, K, eps);
  const index_t m = Q.rows, d = K.cols;
  // Upper bounds on the sensitivities (no ridge: check_options refused one), inflated by the
  // scores' own accuracy so that |q.k_l|^p <= t_l Z holds for sketched or rounded scores too.
  LeverageScores t = sensitivity_bounds(K, o.p, o.leverage);
  for (double& x : t.scores) x = std::min(1.0, x * (1.0 + t.rel_error_bound));
  t.rel_error_bound = 0.0;
  const UniversalSet U = universal_set(t, eps);
  const index_t u = static_cast<index_t>(U.indices.size());
  const NormaliserKeys nk = normaliser_keys(K, t, o, m, stream);
  const index_t nkeys = nk.r > 0 ? nk.r : K.rows;

  HeavyEntries out;
  out.universal_size = u;
  out.rank = t.rank;
  out.p = o.p;
  out.samples = nk.r;
  out.gamma = nk.gamma;
  out.normaliser = nk.r > 0 ? "sampled" : "exact (all keys)";
  const double report = nk.r > 0 ? eps / (1.0 + nk.gamma) : eps;
  const std::vector<double> KU = universal_keys(K, U);

  constexpr index_t kRows = 256, kTile = 512;
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<std::vector<HeavyEntry>> found(static_cast<std::size_t>(blocks));
  std::vector<std::vector<index_t>> zeros(static_cast<std::size_t>(blocks));
  struct Workspace {
    std::vector<double> tile, q, dots, z;
  };
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(d * (nkeys + u));
  detail::parallel_tasks(blocks, flops, [] { return Workspace{}; }, [&](index_t b, Workspace& w) {
    const index_t r0 = b * kRows, rows = std::min(kRows, m - r0);
    w.tile.resize(static_cast<std::size_t>(kRows * kTile));
    rows_to_double(Q, r0, rows, w.q);
    w.z.assign(static_cast<std::size_t>(rows), 0.0);
    for (index_t c0 = 0; c0 < nkeys; c0 += kTile) {
      const index_t c = std::min(kTile, nkeys - c0);
      detail::dgemm_abt(rows, c, d, 1.0, w.q.data(), d, nk.keys64.data() + c0 * d, d, 0.0, w.tile.data(), c);
      for (index_t i = 0; i < rows; ++i) {
        double s = 0.0;
        const double* row = w.tile.data() + i * c;
        if (nk.r > 0)
          for (index_t a = 0; a < c; ++a) s += power(row[a], o.p) * nk.weight[c0 + a];
        else
          for (index_t a = 0; a < c; ++a) s += power(row[a], o.p);
        w.z[i] += s;
      }
    }
    if (u > 0) {
      w.dots.resize(static_cast<std::size_t>(rows * u));
      detail::dgemm_abt(rows, u, d, 1.0, w.q.data(), d, KU.data(), d, 0.0, w.dots.data(), u);
    }
    for (index_t i = 0; i < rows; ++i) {
      if (!(w.z[i] > 0.0)) {
        zeros[b].push_back(r0 + i);
        continue;
      }
      for (index_t a = 0; a < u; ++a) {
        const double v = power(w.dots[i * u + a], o.p) / w.z[i];
        if (v >= report) found[b].push_back({r0 + i, U.indices[a], v});
      }
    }
  });
  merge_blocks(found, zeros, out);
  return out;
}

void check_options(const HeavyOptions& o) {
  LEVATTN_REQUIRE(o.p > 0.0 && std::isfinite(o.p), "p", "expected a finite exponent > 0, got ", o.p);
  if (o.normaliser == Normaliser::sampled) {
    LEVATTN_REQUIRE(o.samples >= 0, "samples", "expected an integer >= 0 (0: from gamma)");
    detail::require_open_unit(o.gamma, "gamma");
    detail::require_open_unit(o.delta, "delta");
  }
  LEVATTN_REQUIRE(o.search == HeavySearch::exact || (o.p == 2.0 && o.normaliser == Normaliser::exact && !o.causal),
                  "search countsketch", "sketches the x^2 search with exact normalisers (p 2, normaliser exact, "
                  "not causal)");
  if (o.search == HeavySearch::countsketch) detail::require_open_unit(o.delta, "delta");
  LEVATTN_REQUIRE(!o.causal || (o.p == 2.0 && o.normaliser == Normaliser::exact), "causal",
                  "heavy entries of causal attention are x^2 with exact normalisers (p 2, normaliser exact)");
  LEVATTN_REQUIRE(o.leverage.ridge == 0.0, "ridge",
                  "heavy entries need ridge 0 (ridge scores are below the x^2 sensitivities, so their sets "
                  "can miss heavy entries)");
}

HeavyEntries heavy_head(ConstMatrix Q, ConstMatrix K, double eps, const HeavyOptions& o,
                        std::uint64_t stream) {
  if (o.causal) return causal_heavy_entries(Q, K, eps, o.leverage);
  if (o.p == 2.0 && o.normaliser == Normaliser::exact) return heavy_x2(Q, K, eps, o, stream);
  return heavy_power(Q, K, eps, o, stream);
}

}  // namespace

HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps) { return heavy_x2(Q, K, eps, {}, 0); }

HeavyEntries heavy_entries(ConstMatrix Q, ConstMatrix K, double eps, const HeavyOptions& o) {
  check_options(o);
  return heavy_head(Q, K, eps, o, 0);
}

std::vector<HeavyEntries> heavy_entries(const Tensor4Ref& Q, const Tensor4Ref& K, double eps,
                                        const HeavyOptions& o) {
  check_options(o);
  LEVATTN_REQUIRE(Q.batch == K.batch && Q.heads == K.heads && Q.batch >= 1 && Q.heads >= 1, "keys",
                  "expected the queries' (batch, heads) = (", Q.batch, ", ", Q.heads, "), got (", K.batch, ", ",
                  K.heads, ")");
  const index_t pairs = Q.batch * Q.heads;
  std::vector<HeavyEntries> out(static_cast<std::size_t>(pairs));
  const double flops = static_cast<double>(pairs) * static_cast<double>(K.rows + Q.rows) *
                       static_cast<double>(K.cols * K.cols);
  // One pair per task, each computed serially inside: no team per pair.
  detail::parallel_tasks(pairs, flops, [] { return 0; }, [&](index_t h, int&) {
    const index_t b = h / Q.heads, hh = h % Q.heads;
    out[h] = heavy_head(Q.slice(b, hh), K.slice(b, hh), eps, o, static_cast<std::uint64_t>(h));
  });
  return out;
}

HeavyEntries heavy_entries_brute_force(ConstMatrix Q, ConstMatrix K, double eps) {
  detail::require_eps(eps);
  detail::require_finite_matrix(Q, "queries");
  detail::require_finite_matrix(K, "keys");
  LEVATTN_REQUIRE(Q.cols == K.cols, "queries", "column count differs from the keys'");
  const index_t m = Q.rows, n = K.rows, d = K.cols;
  // Every dot product q_i.k_l in float64 (blocked DGEMM), no use of M or of leverage scores.
  std::vector<double> k64(static_cast<std::size_t>(n * d));
  for (index_t j = 0; j < n; ++j)
    for (index_t c = 0; c < d; ++c) k64[j * d + c] = K(j, c);
  constexpr index_t kRows = 32;
  const index_t blocks = (m + kRows - 1) / kRows;
  std::vector<std::vector<HeavyEntry>> found(static_cast<std::size_t>(blocks));
  std::vector<std::vector<index_t>> zero(static_cast<std::size_t>(blocks));
  struct Workspace {
    std::vector<double> q, dots;
  };
  const double flops = 2.0 * static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(d);
  const auto make = [&] {
    return Workspace{std::vector<double>(static_cast<std::size_t>(kRows * d)),
                     std::vector<double>(static_cast<std::size_t>(kRows * n))};
  };
  detail::parallel_tasks(blocks, flops, make, [&](index_t b, Workspace& w) {
    const index_t i0 = b * kRows, rows = std::min(kRows, m - i0);
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < d; ++c) w.q[r * d + c] = Q(i0 + r, c);
    detail::dgemm_abt(rows, n, d, 1.0, w.q.data(), d, k64.data(), d, 0.0, w.dots.data(), n);
    for (index_t r = 0; r < rows; ++r) {
      double* s = w.dots.data() + r * n;
      double z = 0.0;
      for (index_t j = 0; j < n; ++j) z += (s[j] = s[j] * s[j]);
      if (z == 0.0) {
        zero[b].push_back(i0 + r);
        continue;
      }
      for (index_t j = 0; j < n; ++j)
        if (s[j] / z >= eps) found[b].push_back({i0 + r, j, s[j] / z});
    }
  });
  HeavyEntries out;
  for (index_t b = 0; b < blocks; ++b) {
    out.entries.insert(out.entries.end(), found[b].begin(), found[b].end());
    out.zero_rows.insert(out.zero_rows.end(), zero[b].begin(), zero[b].end());
  }
  return out;
}

HeavyAgreement compare_heavy_entries(const HeavyEntries& found, const HeavyEntries& truth) {
  HeavyAgreement a;
  const auto& f = found.entries;
  const auto& t = truth.entries;
  for (std::size_t x = 0, y = 0; x < f.size() && y < t.size();) {
    if (f[x].query == t[y].query && f[x].key == t[y].key) {
      a.max_rel_value_error = std::max(a.max_rel_value_error, std::fabs(f[x].value - t[y].value) / t[y].value);
      ++a.common, ++x, ++y;
    } else if (std::tie(f[x].query, f[x].key) < std::tie(t[y].query, t[y].key)) {
      ++x;
    } else {
      ++y;
    }
  }
  if (!t.empty()) a.recall = static_cast<double>(a.common) / static_cast<double>(t.size());
  if (!f.empty()) a.precision = static_cast<double>(a.common) / static_cast<double>(f.size());
  return a;
}

}  // namespace levattn
