// The address-space check of detail/parallel.hpp: may a team of threads start calling the BLAS?
#include <sys/mman.h>
#include <sys/resource.h>

#include "detail/parallel.hpp"

namespace levattn::detail {
namespace {
std::atomic<int> g_blas_threads_ready{0};  // the largest team that has run parallel_tasks
}  // namespace

void note_blas_threads(int threads) {
  int ready = g_blas_threads_ready.load();
  while (ready < threads && !g_blas_threads_ready.compare_exchange_weak(ready, threads)) {
  }
}

bool room_for_blas_threads(int threads) {
  const int fresh = threads - g_blas_threads_ready.load();
  if (fresh <= 0) return true;
  rlimit as{}, data{};
  const bool limited = (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY) ||
                       (getrlimit(RLIMIT_DATA, &data) == 0 && data.rlim_cur != RLIM_INFINITY);
  if (!limited) return true;
  // A private writable mapping counts against both limits; MAP_NORESERVE and no touch: no memory.
  const auto bytes = static_cast<std::size_t>(fresh) * static_cast<std::size_t>(kBlasThreadBytes);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return false;
  munmap(p, bytes);
  return true;
}

}  // namespace levattn::detail
