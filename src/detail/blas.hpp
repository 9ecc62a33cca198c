// detail/blas.hpp: the BLAS / LAPACK the library links (OpenBLAS + LAPACKE), row-major helpers.
// Every size passed to them goes through bi() / li(), which refuse what their 32-bit integers
// cannot hold instead of truncating it.
#pragma once
#include <cblas.h>
#include <lapacke.h>

#include <limits>
#include <string>

#include "detail/require.hpp"
#include "levattn/matrix.hpp"

namespace levattn::detail {

[[noreturn]] inline void integer_range_error(index_t v, const char* library) {
  fail(ErrorKind::invalid_argument, "", "size ", v, " is outside the ", library, " integer range [0, ",
       std::numeric_limits<int>::max(), "]");
}

/// v as a BLAS integer; Error(invalid_argument) if it does not fit.
inline blasint bi(index_t v) {
  if (v < 0 || v > static_cast<index_t>(std::numeric_limits<blasint>::max())) integer_range_error(v, "BLAS");
  return static_cast<blasint>(v);
}

/// v as a LAPACK integer; Error(invalid_argument) if it does not fit.
inline lapack_int li(index_t v) {
  if (v < 0 || v > static_cast<index_t>(std::numeric_limits<lapack_int>::max())) integer_range_error(v, "LAPACK");
  return static_cast<lapack_int>(v);
}

/// C (m x n) = alpha * A (m x k) * B^T (n x k) + beta * C, row-major float.
inline void gemm_abt(index_t m, index_t n, index_t k, float alpha, const float* A, index_t lda,
                     const float* B, index_t ldb, float beta, float* C, index_t ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bi(m), bi(n), bi(k), alpha, A, bi(lda), B,
              bi(ldb), beta, C, bi(ldc));
}

/// C (m x n) = alpha * A (m x k) * B (k x n) + beta * C, row-major float.
inline void gemm_ab(index_t m, index_t n, index_t k, float alpha, const float* A, index_t lda,
                    const float* B, index_t ldb, float beta, float* C, index_t ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, bi(m), bi(n), bi(k), alpha, A, bi(lda), B,
              bi(ldb), beta, C, bi(ldc));
}

/// Same two products in float64.
inline void dgemm_abt(index_t m, index_t n, index_t k, double alpha, const double* A, index_t lda,
                      const double* B, index_t ldb, double beta, double* C, index_t ldc) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bi(m), bi(n), bi(k), alpha, A, bi(lda), B,
              bi(ldb), beta, C, bi(ldc));
}
inline void dgemm_ab(index_t m, index_t n, index_t k, double alpha, const double* A, index_t lda,
                     const double* B, index_t ldb, double beta, double* C, index_t ldc) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, bi(m), bi(n), bi(k), alpha, A, bi(lda), B,
              bi(ldb), beta, C, bi(ldc));
}

/// C (m x n) = alpha op(A) op(B) + beta C, row-major, for float and double: the one GEMM of the
/// kernels templated on the scalar (op(X) = X or X^T by ta / tb).
inline void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, index_t m, index_t n, index_t k, float alpha,
                 const float* A, index_t lda, const float* B, index_t ldb, float beta, float* C, index_t ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, bi(m), bi(n), bi(k), alpha, A, bi(lda), B, bi(ldb), beta, C, bi(ldc));
}
inline void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, index_t m, index_t n, index_t k, double alpha,
                 const double* A, index_t lda, const double* B, index_t ldb, double beta, double* C,
                 index_t ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, bi(m), bi(n), bi(k), alpha, A, bi(lda), B, bi(ldb), beta, C, bi(ldc));
}

/// y (m) = alpha op(A) x + beta y for A (rows x cols, row-major, leading dimension lda), float
/// and double; op(A) = A (m = rows) or A^T (m = cols) by ta.
inline void gemv(CBLAS_TRANSPOSE ta, index_t rows, index_t cols, float alpha, const float* A, index_t lda,
                 const float* x, float beta, float* y) {
  cblas_sgemv(CblasRowMajor, ta, bi(rows), bi(cols), alpha, A, bi(lda), x, 1, beta, y, 1);
}
inline void gemv(CBLAS_TRANSPOSE ta, index_t rows, index_t cols, double alpha, const double* A, index_t lda,
                 const double* x, double beta, double* y) {
  cblas_dgemv(CblasRowMajor, ta, bi(rows), bi(cols), alpha, A, bi(lda), x, 1, beta, y, 1);
}

/// C (d x d, upper triangle) = A^T A + beta C for A (rows x d, leading dimension lda), float64.
inline void dsyrk_ata(index_t d, index_t rows, const double* A, index_t lda, double beta, double* C) {
  cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, bi(d), bi(rows), 1.0, A, bi(lda), beta, C, bi(d));
}

}  // namespace levattn::detail
