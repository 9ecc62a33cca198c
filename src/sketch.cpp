// Sketching operators Y = S A: CountSketch, SRHT and Gaussian. Every random quantity is a
// counter-based Philox draw indexed by its position in S, so S is a pure function of
// (kind, seed, n, s); the work is split into tasks fixed by the shape alone, so Y does not depend
// on the thread count either.
#include "levattn/sketch.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <type_traits>
#include <vector>

#include "detail/blas.hpp"
#include "detail/gram.hpp"
#include "detail/names.hpp"
#include "detail/parallel.hpp"
#include "detail/rng.hpp"
#include "selectors.hpp"
#include "detail/validate.hpp"

namespace levattn {
namespace {

constexpr index_t kGaussRows = 32;    // rows of S (and Y) per task
constexpr index_t kGaussInner = 256;  // columns of S (rows of A) per generated block
constexpr index_t kGaussCols = 2048;  // columns of A (and Y) per task
constexpr index_t kHadamardCols = 32; // columns per Walsh-Hadamard task

// A row-major n x d matrix of float or double elements.
template <class T>
struct Rows {
  const T* data;
  index_t n, d, ld;
  const T* row(index_t i) const { return data + i * ld; }
};

index_t next_pow2(index_t n) {
  index_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

void check_s(index_t n, index_t s, SketchKind kind) {
  LEVATTN_REQUIRE(s >= 1, "s", "expected s >= 1 rows of the sketch, got ", s);
  LEVATTN_REQUIRE(kind != SketchKind::srht || s <= next_pow2(n), "s", "expected s <= n' = ", next_pow2(n),
                  " for srht (n = ", n, " rows padded to the next power of 2), got ", s);
}

void require_finite(const double* A, index_t n, index_t d, index_t ld, const char* what) {
  LEVATTN_REQUIRE(A != nullptr && n > 0 && d > 0, what, "expected a non-empty matrix, got shape (", n, ", ", d, ")");
  LEVATTN_REQUIRE(ld >= d, what, "expected a leading dimension >= ", d, " columns, got ", ld);
  for (index_t i = 0; i < n; ++i)
    for (index_t j = 0; j < d; ++j)
      LEVATTN_REQUIRE(std::isfinite(A[i * ld + j]), what, "expected finite values, found ", A[i * ld + j],
                      " at row ", i, ", column ", j);
}

// ---------------------------------------------------------------------------------------------
// CountSketch: input row i goes to output row h(i) with sign sigma(i), both from draw i.

// Which input rows feed each output row: rows start[b] .. start[b+1]-1 of `order`, ascending, with
// their signs. A pure function of (n, s, seed).
struct CountSketchPlan {
  std::vector<index_t> start, order;
  std::vector<double> sign;
};

CountSketchPlan countsketch_plan(index_t n, index_t s, std::uint64_t seed) {
  const detail::CounterRng rng(seed, detail::Purpose::countsketch);
  CountSketchPlan plan;
  std::vector<index_t> bucket(static_cast<std::size_t>(n));
  plan.sign.resize(static_cast<std::size_t>(n));
#pragma omp parallel for schedule(static) if (n > (1 << 14))
  for (index_t i = 0; i < n; ++i) {
    const std::uint64_t v = rng.u64(static_cast<std::uint64_t>(i));
    plan.sign[i] = (v & 1u) ? -1.0 : 1.0;
    bucket[i] = static_cast<index_t>(
        (static_cast<detail::uint128>(v >> 1) * static_cast<std::uint64_t>(s)) >> 63);
  }
  // Counting sort by bucket, stable: each output row lists its input rows in ascending order.
  plan.start.assign(static_cast<std::size_t>(s + 1), 0);
  plan.order.resize(static_cast<std::size_t>(n));
  for (index_t i = 0; i < n; ++i) ++plan.start[bucket[i] + 1];
  for (index_t b = 0; b < s; ++b) plan.start[b + 1] += plan.start[b];
  std::vector<index_t> next(plan.start.begin(), plan.start.end() - 1);
  for (index_t i = 0; i < n; ++i) plan.order[next[bucket[i]]++] = i;
  return plan;
}

// Output rows b0 .. b1-1 of S A into y (row-major, d columns, zeroed here), each summed in
// input-row order: the same result for any schedule.
// Returns false if a non-finite value was met (the caller reports where). Sums of finite float
// inputs cannot overflow float64 here, so an output is finite exactly when its inputs are.
template <class T>
bool countsketch_rows(const CountSketchPlan& plan, const Rows<T>& A, index_t b0, index_t b1, double* y) {
  const index_t d = A.d;
  bool finite = true;
  for (index_t b = b0; b < b1; ++b) {
    double* out = y + (b - b0) * d;
    std::fill_n(out, d, 0.0);
    for (index_t k = plan.start[b]; k < plan.start[b + 1]; ++k) {
      const index_t i = plan.order[k];
      const T* a = A.row(i);
      const double sg = plan.sign[i];
      for (index_t j = 0; j < d; ++j) out[j] += sg * static_cast<double>(a[j]);
    }
    double check = 0.0;  // 0 * x is NaN exactly when x is not finite
    for (index_t j = 0; j < d; ++j) check += 0.0 * out[j];
    finite = finite && check == 0.0;
  }
  return finite;
}

template <class T>
DenseMatrix<double> countsketch(const Rows<T>& A, index_t s, std::uint64_t seed) {
  const CountSketchPlan plan = countsketch_plan(A.n, s, seed);
  DenseMatrix<double> Y(s, A.d);
#pragma omp parallel for schedule(dynamic, 16) if (A.n * A.d > (1 << 16))
  for (index_t b = 0; b < s; b += 16)
    countsketch_rows(plan, A, b, std::min(s, b + 16), Y.row(b));
  return Y;
}

// (S A)^T (S A) for CountSketch without storing S A: blocks of output rows go through the
// fixed-order Gram accumulator, so the result is thread-count free.
template <class T>
std::vector<double> countsketch_gram(const Rows<T>& A, index_t s, std::uint64_t seed) {
  constexpr index_t kBlock = 1024;
  const CountSketchPlan plan = countsketch_plan(A.n, s, seed);
  const index_t blocks = (s + kBlock - 1) / kBlock;
  std::atomic<bool> finite{true};
  std::vector<double> G = detail::fixed_order_gram(blocks, std::min(kBlock, s), A.d, [&](index_t blk, double* y) {
    const index_t b0 = blk * kBlock, b1 = std::min(s, b0 + kBlock);
    if (!countsketch_rows(plan, A, b0, b1, y)) finite.store(false, std::memory_order_relaxed);
    return b1 - b0;
  });
  if (!finite) return {};  // the caller names the entry
  return G;
}

// ---------------------------------------------------------------------------------------------
// Gaussian: S_ij = g(i n + j) / sqrt(s), g(c) the standard normal number c of the stream.

void fill_normals(const detail::CounterRng& rng, std::uint64_t c0, index_t count, double scale,
                  double* out) {
  for (index_t k = 0; k < count; ++k) out[k] = scale * rng.normal(c0 + static_cast<std::uint64_t>(k));
}

template <class T>
DenseMatrix<double> gaussian(const Rows<T>& A, index_t s, std::uint64_t seed) {
  const index_t n = A.n, d = A.d;
  const detail::CounterRng rng(seed, detail::Purpose::gaussian_sketch);
  const double scale = 1.0 / std::sqrt(static_cast<double>(s));
  DenseMatrix<double> Y(s, d);
  // Tasks: (block of S rows) x (block of A columns), fixed by the shape. Within a task the inner
  // dimension is summed block after block in order, each block by one single-threaded DGEMM
  // (detail::parallel_tasks), so every entry of Y sees the same operations for any thread count.
  const index_t row_tasks = (s + kGaussRows - 1) / kGaussRows;
  const index_t col_tasks = (d + kGaussCols - 1) / kGaussCols;
  const index_t tasks = row_tasks * col_tasks;
  struct Workspace {
    std::vector<double> S, a;
  };
  const double flops = 2.0 * static_cast<double>(s) * static_cast<double>(n) * static_cast<double>(d);
  detail::parallel_tasks(tasks, flops, [] { return Workspace{}; }, [&](index_t t, Workspace& w) {
    std::vector<double>& S = w.S;
    std::vector<double>& a = w.a;
    const index_t r0 = (t / col_tasks) * kGaussRows, rows = std::min(kGaussRows, s - r0);
    const index_t c0 = (t % col_tasks) * kGaussCols, cols = std::min(kGaussCols, d - c0);
    for (index_t k0 = 0; k0 < n; k0 += kGaussInner) {
      const index_t kb = std::min(kGaussInner, n - k0);
      S.resize(static_cast<std::size_t>(rows * kb));
      for (index_t i = 0; i < rows; ++i)
        fill_normals(rng, static_cast<std::uint64_t>((r0 + i) * n + k0), kb, scale,
                     S.data() + i * kb);
      const double* ablk;
      index_t lda;
      if constexpr (std::is_same_v<T, double>) {
        ablk = A.row(k0) + c0;
        lda = A.ld;
      } else {
        a.resize(static_cast<std::size_t>(kb * cols));
        for (index_t i = 0; i < kb; ++i) {
          const T* src = A.row(k0 + i) + c0;
          double* dst = a.data() + i * cols;
          for (index_t j = 0; j < cols; ++j) dst[j] = static_cast<double>(src[j]);
        }
        ablk = a.data();
        lda = cols;
      }
      detail::dgemm_ab(rows, cols, kb, 1.0, S.data(), kb, ablk, lda, k0 == 0 ? 0.0 : 1.0,
                       Y.row(r0) + c0, d);
    }
  });
  return Y;
}

// ---------------------------------------------------------------------------------------------
// SRHT: B = D A zero-padded to n' rows, B <- H_unnormalised B (in place, butterflies), then
// Y = B[P] / sqrt(s), since sqrt(n'/s) H = H_unnormalised / sqrt(s).

template <class T>
DenseMatrix<double> srht(const Rows<T>& A, index_t s, std::uint64_t seed) {
  const index_t n = A.n, d = A.d, np = next_pow2(n);
  const detail::CounterRng sign_rng(seed, detail::Purpose::srht_signs);
  DenseMatrix<double> B(np, d);  // zero-initialised: the padding rows stay 0
#pragma omp parallel for schedule(static) if (n * d > (1 << 16))
  for (index_t i = 0; i < n; ++i) {
    const double sg = (sign_rng.u64(static_cast<std::uint64_t>(i)) & 1u) ? -1.0 : 1.0;
    const T* a = A.row(i);
    double* b = B.row(i);
    for (index_t j = 0; j < d; ++j) b[j] = sg * static_cast<double>(a[j]);
  }
  // Each task transforms a fixed band of columns through all log2(n') stages; the butterflies of
  // one column never mix with another, so the band split changes nothing in the result.
  const index_t tasks = (d + kHadamardCols - 1) / kHadamardCols;
#pragma omp parallel for schedule(dynamic, 1) if (np * d > (1 << 14))
  for (index_t t = 0; t < tasks; ++t) {
    const index_t c0 = t * kHadamardCols, w = std::min(kHadamardCols, d - c0);
    for (index_t h = 1; h < np; h <<= 1)
      for (index_t i = 0; i < np; i += 2 * h)
        for (index_t j = i; j < i + h; ++j) {
          double* x = B.row(j) + c0;
          double* y = B.row(j + h) + c0;
#pragma omp simd
          for (index_t c = 0; c < w; ++c) {
            const double u = x[c], v = y[c];
            x[c] = u + v;
            y[c] = u - v;
          }
        }
  }
  const std::vector<index_t> rows = detail::random_keys(np, s, detail::CounterRng(seed, detail::Purpose::srht_rows));
  const double scale = 1.0 / std::sqrt(static_cast<double>(s));
  DenseMatrix<double> Y(s, d);
  for (index_t k = 0; k < s; ++k) {
    const double* b = B.row(rows[k]);
    double* y = Y.row(k);
    for (index_t j = 0; j < d; ++j) y[j] = scale * b[j];
  }
  return Y;
}

template <class T>
DenseMatrix<double> dispatch(const Rows<T>& A, index_t s, SketchKind kind, std::uint64_t seed) {
  switch (kind) {
    case SketchKind::countsketch: return countsketch(A, s, seed);
    case SketchKind::gaussian: return gaussian(A, s, seed);
    case SketchKind::srht: return srht(A, s, seed);
  }
  detail::fail(ErrorKind::invalid_argument, "sketch", "unknown sketch kind");
}

}  // namespace

namespace {

constexpr std::pair<SketchKind, const char*> kSketchNames[] = {
    {SketchKind::countsketch, "countsketch"}, {SketchKind::srht, "srht"}, {SketchKind::gaussian, "gaussian"}};

}  // namespace

std::string to_string(SketchKind kind) { return detail::name_of(kSketchNames, kind); }
SketchKind parse_sketch_kind(const std::string& name) { return detail::parse_name(kSketchNames, name, "sketch"); }

DenseMatrix<double> sketch_rows(ConstMatrix A, index_t s, SketchKind kind, std::uint64_t seed) {
  detail::require_finite_matrix(A, "matrix");
  check_s(A.rows, s, kind);
  return dispatch(Rows<float>{A.data, A.rows, A.cols, A.ld}, s, kind, seed);
}

std::vector<double> sketch_gram(ConstMatrix A, index_t s, SketchKind kind, std::uint64_t seed) {
  if (A.rows <= 0 || A.cols <= 0) detail::require_finite_matrix(A, "matrix");  // names the shape
  check_s(A.rows, s, kind);
  const Rows<float> rows{A.data, A.rows, A.cols, A.ld};
  if (kind == SketchKind::countsketch) {
    // A is read once; finiteness is checked on the way.
    std::vector<double> G = countsketch_gram(rows, s, seed);
    if (G.empty()) detail::require_finite_matrix(A, "matrix");
    return G;
  }
  detail::require_finite_matrix(A, "matrix");
  const DenseMatrix<double> Y = dispatch(rows, s, kind, seed);
  const index_t d = A.cols;
  std::vector<double> G(static_cast<std::size_t>(d * d), 0.0);
  detail::dsyrk_ata(d, s, Y.data.data(), d, 0.0, G.data());
  detail::symmetrize_upper(G, d);
  return G;
}

DenseMatrix<double> sketch_rows(const double* A, index_t n, index_t d, index_t ld, index_t s,
                                SketchKind kind, std::uint64_t seed) {
  require_finite(A, n, d, ld, "matrix");
  check_s(n, s, kind);
  return dispatch(Rows<double>{A, n, d, ld}, s, kind, seed);
}

}  // namespace levattn
