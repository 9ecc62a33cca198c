// detail/parallel.hpp: OpenMP helpers. Exceptions never escape a parallel region (the first one
// is captured and rethrown on the calling thread), small problems run on the calling thread, and
// no thread team is forked around a BLAS or LAPACK call.
#pragma once
#include <omp.h>

#include <atomic>
#include <exception>
#include <mutex>
#include <optional>

#include "levattn/matrix.hpp"

namespace levattn::detail {

class ExceptionTrap {
 public:
  /// Runs f unless an earlier call failed (the result is an error then anyway).
  template <class F>
  void run(F&& f) noexcept {
    if (failed_.load(std::memory_order_relaxed)) return;
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
  std::atomic<bool> failed_{false};
};

/// Below this many floating-point operations a call runs on the calling thread: waking a team
/// costs tens of microseconds (more when its threads have gone to sleep or the cores are busy),
/// which is more than 2^22 flops take on one core.
inline constexpr double kSerialFlops = 4.0 * 1024 * 1024;

/// While alive, parallel regions opened by this thread (levattn's and the BLAS's, whose OpenMP
/// build sizes its team by omp_get_max_threads()) run on this thread alone. It changes only this
/// thread's OpenMP setting (nthreads-var is per thread), so concurrent callers are unaffected,
/// and it forks nothing: the cheap way to run LAPACK serially on a small matrix.
class SerialScope {
 public:
  explicit SerialScope(bool serial = true)
      : saved_(omp_get_max_threads()), active_(serial && saved_ > 1) {
    if (active_) omp_set_num_threads(1);
  }
  ~SerialScope() {
    if (active_) omp_set_num_threads(saved_);
  }
  SerialScope(const SerialScope&) = delete;
  SerialScope& operator=(const SerialScope&) = delete;

 private:
  int saved_;
  bool active_;
};

/// Whether work of `flops` should use a thread team: enough work, several threads, and not
/// already inside an active parallel region (where nested regions get one thread anyway).
inline bool worth_parallel(double flops) {
  return flops >= kSerialFlops && omp_get_max_threads() > 1 && !omp_in_parallel();
}

/// Whether a team of `threads` threads can call the BLAS under the process's address-space
/// limits. OpenBLAS gives every thread that calls it a work buffer of its own (128 MiB on x86-64),
/// allocated at its first call beside a malloc arena of the thread's (64 MiB of address space),
/// and where that allocation fails it retries forever (OpenBLAS 0.3.21): under ulimit -v the team
/// would hang. So where RLIMIT_AS or RLIMIT_DATA is set, this reserves (and releases at once) that
/// much address space for each thread beyond the most that a team of parallel_tasks has run with
/// so far (those threads have their buffers); with no limit it is one getrlimit pair and true.
bool room_for_blas_threads(int threads);
/// Records that a team of `threads` threads (1: the calling thread) has run parallel_tasks.
void note_blas_threads(int threads);
/// The address space room_for_blas_threads asks of each thread: 128 MiB + 64 MiB.
inline constexpr double kBlasThreadBytes = 192.0 * 1024 * 1024;

/// Runs body(t, workspace) for t in [0, tasks) on a team when worth_parallel(flops), else on the
/// calling thread alone (BLAS calls included: either way every BLAS call in body is serial, so
/// results do not depend on the thread count). Each thread builds its workspace with make() inside the exception trap, so a
/// failed allocation is rethrown on the caller like any other error. Task order is dynamic: the
/// body must write disjoint results.
template <class Make, class Body>
void parallel_tasks(index_t tasks, double flops, Make&& make, Body&& body) {
  ExceptionTrap trap;
  if (tasks <= 1 || !worth_parallel(flops) || !room_for_blas_threads(omp_get_max_threads())) {
    if (!room_for_blas_threads(1))
      allocation_failed(kBlasThreadBytes, "the BLAS work buffer and arena of the calling thread");
    const SerialScope serial;
    trap.run([&] {
      auto ws = make();
      for (index_t t = 0; t < tasks; ++t) body(t, ws);
    });
    trap.rethrow();
    note_blas_threads(1);
    return;
  }
  std::atomic<int> team{1};
#pragma omp parallel
  {
#pragma omp single nowait
    team = omp_get_num_threads();
    // Every thread takes part in the loop, even one whose workspace failed (it skips its tasks).
    std::optional<decltype(make())> ws;
    trap.run([&] { ws.emplace(make()); });
#pragma omp for schedule(dynamic, 1)
    for (index_t t = 0; t < tasks; ++t)
      if (ws) trap.run([&] { body(t, *ws); });
  }
  trap.rethrow();
  note_blas_threads(team);
}

}  // namespace levattn::detail
