// test_alloc_failure.cpp: an allocation that fails on a worker thread of a parallel region must
// reach the caller as std::bad_alloc (never std::terminate), and the library must work after it.
// This program replaces the global operator new, so it is a test binary of its own.
#include <gtest/gtest.h>
#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <new>

#include "cases.hpp"

// operator new below allocates with malloc, so free is its match (GCC cannot see that).
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"

namespace {
std::atomic<int> g_fail_on_worker{0};  // > 0: the next allocations on a worker thread fail
}

void* operator new(std::size_t n) {
  if (g_fail_on_worker.load() > 0 && omp_in_parallel() && omp_get_thread_num() != 0 &&
      g_fail_on_worker.fetch_sub(1) > 0)
    throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// The array forms too: a sanitizer runtime replaces them, so they would not reach the one above.
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace levattn;
using oracle::Mat;

namespace {

// Runs f with 2 threads and one failing worker allocation, then again without. Which thread
// takes which task is up to the scheduler (on a busy machine the calling thread may run them
// all), so f runs again until a worker allocation has failed; that call must throw bad_alloc.
template <class F>
void expect_bad_alloc_then_success(const char* what, F&& f) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(2);
  bool injected = false;
  for (int attempt = 0; attempt < 50 && !injected; ++attempt) {
    g_fail_on_worker = 1;
    bool threw = false;
    try {
      f();
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    injected = g_fail_on_worker.load() <= 0;
    EXPECT_EQ(threw, injected) << what << ": a failed worker allocation must reach the caller as bad_alloc";
  }
  EXPECT_TRUE(injected) << what << ": no allocation on a worker thread in 50 calls";
  g_fail_on_worker = 0;
  EXPECT_NO_THROW(f()) << what;
  omp_set_num_threads(saved);
}

}  // namespace

TEST(AllocationFailure, ReachesTheCallerFromEveryParallelRegion) {
  const index_t b = 2, h = 4, n = 1024, d = 32;
  const Mat Q = oracle::gaussian(b * h * n, d, 1), K = oracle::gaussian(b * h * n, d, 2),
            V = oracle::gaussian(b * h * n, d, 3);
  const Tensor4Ref q{Q.v.data(), b, h, n, d}, k{K.v.data(), b, h, n, d}, v{V.v.data(), b, h, n, d};
  std::vector<float> out(Q.v.size());
  for (Select s : {Select::full, Select::leverage, Select::topk}) {
    AttentionOptions o;
    o.select = s;
    o.top_k = s == Select::full ? 0 : 16;
    expect_bad_alloc_then_success(to_string(s).c_str(), [&] { attention(q, k, v, out.data(), o); });
  }
  const Mat big = oracle::gaussian(200000, 16, 4);
  expect_bad_alloc_then_success("leverage_scores", [&] { (void)leverage_scores(big.view()); });
  expect_bad_alloc_then_success("heavy_entries", [&] { (void)heavy_entries(big.view(), big.view(), 0.5); });
  expect_bad_alloc_then_success("heavy_entries batched", [&] { (void)heavy_entries(q, k, 0.5, HeavyOptions{}); });
  LewisOptions lo;
  lo.p = 3.0;
  expect_bad_alloc_then_success("lewis_weights", [&] { (void)lewis_weights(big.view(), lo); });
  expect_bad_alloc_then_success("sketch", [&] { (void)sketch_rows(big.view(), 400, SketchKind::gaussian, 1); });
  const Mat X = oracle::gaussian(300, 4000, 5);
  expect_bad_alloc_then_success("softmax_gram_error", [&] { (void)softmax_gram_error(X.view(), X.view()); });
  const Mat Qs = oracle::gaussian(2000, 16, 6), Ks = oracle::gaussian(2000, 16, 7), Vs = oracle::gaussian(2000, 8, 8);
  AttentionOptions lev;
  lev.select = Select::leverage;
  lev.top_k = 32;
  lev.return_selection = true;
  AttentionResult r;
  const std::vector<float> approx = attention(Qs.view(), Ks.view(), Vs.view(), lev, &r);
  expect_bad_alloc_then_success("selection_metrics",
                                [&] { (void)selection_metrics(Qs.view(), Ks.view(), Vs.view(), approx.data(), lev, r.selection); });
  expect_bad_alloc_then_success("heavy_entries_brute_force",
                                [&] { (void)heavy_entries_brute_force(Qs.view(), Ks.view(), 0.1); });
}
