// Causal universal sets (the streaming set advanced a block at a time) and the exact causal
// x^2 heavy entries over them.
#include "levattn/causal.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "detail/blas.hpp"
#include "detail/parallel.hpp"
#include "detail/validate.hpp"
#include "levattn/streaming.hpp"

namespace levattn {
namespace {

void check_keys(ConstMatrix K, index_t block) {
  LEVATTN_REQUIRE(K.rows >= 1 && K.cols >= 1, "keys", "expected a non-empty array, got ", K.rows, " rows of ", K.cols,
                  " columns");
  LEVATTN_REQUIRE(block >= 1, "causal", "block must be >= 1, got ", block);
  detail::require_finite_matrix(K, "keys");
}

// Ridge scores are below the x^2 sensitivities: pruning by them could drop a heavy key.
void require_no_ridge(const LeverageOptions& options, const char* what) {
  LEVATTN_REQUIRE(options.ridge == 0.0, what,
                  "needs ridge 0 (ridge scores are below the x^2 sensitivities, so their sets can miss heavy entries)");
}

// Calls visit(r0, r1, set, stream) for each block of keys r0 .. r1 - 1: set is the block's causal
// set, stream holds (and its gram() gives) every key before r0.
template <class Visit>
void for_each_causal_block(ConstMatrix K, double eps, index_t block, const LeverageOptions& options, Visit&& visit) {
  StreamingUniversalSet stream(K.cols, 0, eps, options);
  std::vector<index_t> set;
  for (index_t r0 = 0; r0 < K.rows; r0 += block) {
    const index_t r1 = std::min(K.rows, r0 + block);
    if (r0 > 0) stream.prune();
    set.assign(stream.candidate_indices().begin(), stream.candidate_indices().end());
    for (index_t j = r0; j < r1; ++j) set.push_back(j);
    visit(r0, r1, static_cast<const std::vector<index_t>&>(set), static_cast<const StreamingUniversalSet&>(stream));
    stream.push(ConstMatrix{K.row(r0), r1 - r0, K.cols, K.ld});
  }
}

}  // namespace

Selection causal_universal_sets(ConstMatrix K, double eps, index_t block, const LeverageOptions& options) {
  check_keys(K, block);
  require_no_ridge(options, "causal sets");
  Selection out;
  out.batch = out.heads = 1;
  out.m = out.n = K.rows;
  out.causal = true;
  out.segment = block;
  out.shared_keys.reserve(static_cast<std::size_t>((K.rows + block - 1) / block));
  for_each_causal_block(K, eps, block, options, [&](index_t, index_t, const std::vector<index_t>& set, const auto&) {
    out.shared_keys.push_back(set);
  });
  return out;
}

HeavyEntries causal_heavy_entries(ConstMatrix Q, ConstMatrix K, double eps, const LeverageOptions& options) {
  check_keys(K, kCausalBlock);
  LEVATTN_REQUIRE(Q.rows == K.rows && Q.cols == K.cols, "queries", "expected ", K.rows, " rows of ", K.cols,
                  " columns (one per key, causal), got ", Q.rows, " of ", Q.cols);
  detail::require_finite_matrix(Q, "queries");
  require_no_ridge(options, "causal heavy entries");
  const index_t d = K.cols;
  HeavyEntries out;
  out.normaliser = "exact (q^T M q over the prefix, float64)";
  std::vector<std::vector<HeavyEntry>> rows(static_cast<std::size_t>(kCausalBlock));
  std::vector<double> qd, kd, dots, norms;
  for_each_causal_block(K, eps, kCausalBlock, options, [&](index_t r0, index_t r1, const std::vector<index_t>& set,
                                                           const StreamingUniversalSet& stream) {
    const index_t b = r1 - r0, u = static_cast<index_t>(set.size());
    out.universal_size = std::max(out.universal_size, u);
    const std::vector<double> M = stream.gram();
    double trace = 0.0;
    for (index_t x = 0; x < d; ++x) trace += M[x * d + x];
    // Products in float64: the block's queries against its set, and q^T M q.
    qd.resize(static_cast<std::size_t>(b * d));
    kd.resize(static_cast<std::size_t>(u * d));
    for (index_t r = 0; r < b; ++r) std::copy_n(Q.row(r0 + r), d, qd.data() + r * d);
    for (index_t a = 0; a < u; ++a) std::copy_n(K.row(set[a]), d, kd.data() + a * d);
    dots.resize(static_cast<std::size_t>(b * u));
    detail::dgemm_abt(b, u, d, 1.0, qd.data(), d, kd.data(), d, 0.0, dots.data(), u);
    norms.resize(static_cast<std::size_t>(b * d));
    detail::dgemm_abt(b, d, d, 1.0, qd.data(), d, M.data(), d, 0.0, norms.data(), d);
    const index_t own = u - b;  // the block's keys are the set's last b entries
    detail::parallel_tasks(b, static_cast<double>(b * u * 4), [] { return 0; }, [&](index_t r, int&) {
      const double* q = qd.data() + r * d;
      const double* g = dots.data() + r * u;
      double z = 0.0, qq = 0.0, tr = trace;
      for (index_t x = 0; x < d; ++x) z += q[x] * norms[r * d + x], qq += q[x] * q[x];
      for (index_t a = own; a <= own + r; ++a) {
        z += g[a] * g[a];
        for (index_t x = 0; x < d; ++x) tr += kd[a * d + x] * kd[a * d + x];
      }
      rows[r].clear();
      if (z <= 4.0 * static_cast<double>(d) * std::numeric_limits<double>::epsilon() * tr * qq) {
        rows[r].push_back({r0 + r, -1, 0.0});  // a zero row
        return;
      }
      for (index_t a = 0; a <= own + r; ++a)
        if (g[a] * g[a] / z >= eps) rows[r].push_back({r0 + r, set[a], g[a] * g[a] / z});
    });
    for (index_t r = 0; r < b; ++r) {
      if (!rows[r].empty() && rows[r][0].key < 0) out.zero_rows.push_back(r0 + r);
      else out.entries.insert(out.entries.end(), rows[r].begin(), rows[r].end());
    }
  });
  return out;
}

std::vector<HeavyEntries> causal_heavy_entries(const Tensor4Ref& Q, const Tensor4Ref& K, double eps,
                                               const LeverageOptions& options) {
  LEVATTN_REQUIRE(Q.batch == K.batch && Q.heads == K.heads && Q.batch >= 1 && Q.heads >= 1, "keys",
                  "expected the queries' (batch, heads) = (", Q.batch, ", ", Q.heads, "), got (", K.batch, ", ",
                  K.heads, ")");
  const index_t pairs = Q.batch * Q.heads;
  std::vector<HeavyEntries> out(static_cast<std::size_t>(pairs));
  const double flops = static_cast<double>(pairs * K.rows) * static_cast<double>(K.cols * K.cols) * 4.0;
  detail::parallel_tasks(pairs, flops, [] { return 0; }, [&](index_t h, int&) {
    out[h] = causal_heavy_entries(Q.slice(h / Q.heads, h % Q.heads), K.slice(h / Q.heads, h % Q.heads), eps, options);
  });
  return out;
}

}  // namespace levattn
