// detail/lapack.hpp: the LAPACK calls of the library (symmetric eigendecomposition, Cholesky and
// triangular inverse), each on a small d x d matrix, run serially on the calling thread.
#pragma once
#include <vector>

#include "levattn/matrix.hpp"

namespace levattn::detail {

/// Eigendecomposition of the symmetric r x r row-major matrix `a` (upper triangle read): returns
/// the eigenvalues ascending and overwrites `a` with the eigenvectors (in columns). `who` names
/// the caller in the Error(internal) thrown if LAPACK fails. O(r^3).
std::vector<double> symmetric_eigen(std::vector<double>& a, index_t r, const char* who);

/// L^-1 for the Cholesky factor L L^T = a of the symmetric r x r row-major matrix `a` (lower
/// triangle read), written into the lower triangle of `a`. Returns false, leaving `a` undefined,
/// if `a` is not numerically positive definite. O(r^3).
bool inverse_cholesky(std::vector<double>& a, index_t r);

/// R (d x d, upper triangular, row-major, zero below the diagonal) of a Householder QR of the
/// float64 matrix `a` (rows x d, row-major; overwritten): a = Q R. With rows < d the last d - rows
/// rows of R are zero. O(rows d^2).
std::vector<double> householder_r(std::vector<double>& a, index_t rows, index_t d);

/// R with K = Q R (d x d upper triangular, float64) for K (n x d, float32): R^T R = K^T K, but
/// backward stable, so ||R q|| = ||K q|| (1 + O(n d u ||K|| ||q|| / ||K q||)) even for q nearly
/// orthogonal to every key, where q^T (K^T K) q would lose every digit. Blocks of rows are folded
/// into a fixed number of partial factors in a fixed order, then those are combined in order
/// (tall-skinny QR): the bits do not depend on the thread count. O(n d^2) time, O(16 d^2 +
/// block d) memory. K must be finite.
std::vector<double> key_r_factor(ConstMatrix K);

}  // namespace levattn::detail
