// detail/parallel.hpp: OpenMP helpers. Exceptions must never escape a parallel region: the first
// one is captured and rethrown on the calling thread after the region ends.
#pragma once
#include <omp.h>

#include <exception>
#include <mutex>

namespace levattn::detail {

class ExceptionTrap {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr error_;
};

/// Threads to use for a parallel region: `requested` if positive, else the OpenMP default.
inline int thread_count(int requested) { return requested > 0 ? requested : omp_get_max_threads(); }

/// Runs f with the linked BLAS single-threaded. OpenBLAS's OpenMP build runs serially inside an
/// active parallel region; without one, a small LAPACK call (a d x d eigendecomposition) forks a
/// thread team for every inner BLAS call, which costs more than the work and stalls badly when
/// the cores are busy.
template <class F>
void with_serial_blas(F&& f) {
  ExceptionTrap trap;
#pragma omp parallel num_threads(2)
  {
#pragma omp master
    trap.run(f);
  }
  trap.rethrow();
}

}  // namespace levattn::detail
