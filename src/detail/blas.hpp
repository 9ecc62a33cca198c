// detail/blas.hpp: the BLAS / LAPACK the library links (OpenBLAS + LAPACKE), row-major helpers.
#pragma once
#include <cblas.h>
#include <lapacke.h>

#include "levattn/matrix.hpp"

namespace levattn::detail {

inline blasint bi(index_t v) { return static_cast<blasint>(v); }

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

}  // namespace levattn::detail
