// levattn/sketch.hpp: random sketching operators (oblivious subspace embeddings) S with
// E[S^T S] = I, applied to the rows of a matrix: Y = S A.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "levattn/matrix.hpp"

namespace levattn {

/// The random matrix S (s x n) of a sketch.
enum class SketchKind {
  countsketch,  ///< one random +-1 per column of S, in a random row: O(nnz(A)) to apply
  srht,         ///< subsampled randomised Hadamard transform: O(n' d log n')
  gaussian,     ///< i.i.d. N(0, 1/s) entries: O(s n d)
};

/// "countsketch", "srht" or "gaussian".
std::string to_string(SketchKind kind);

/// The inverse of to_string. Throws Error(invalid_argument)
/// "sketch: expected countsketch, srht or gaussian, got 'x'" for anything else.
SketchKind parse_sketch_kind(const std::string& name);

/// Y = S A: the s x d sketch of the n x d row-major matrix A, in float64.
///
/// S is an s x n random matrix with E[S^T S] = I, so E[||S A x||^2] = ||A x||^2 for every x, and
/// for s large enough S is a subspace embedding of range(A) with high probability:
/// (1 - eps) ||A x|| <= ||S A x|| <= (1 + eps) ||A x|| for all x at once, with
///   - countsketch: s = O(rank(A)^2 / eps^2); S has one entry +-1 per column: row h(i) of S has
///     sign sigma(i) in column i. Applying it adds row i of A, times sigma(i), to row h(i) of Y.
///     Time O(n d) (O(nnz(A))), memory O(n + s d).
///   - gaussian: s = O((rank(A) + log(1/delta)) / eps^2); S_ij ~ N(0, 1/s) i.i.d. (Box-Muller
///     on 53-bit uniforms, detail/rng.hpp). S is generated in blocks of 32 x 256 and multiplied by DGEMM, never
///     whole. Time O(s n d), memory O(s d + block).
///   - srht: s = O((rank(A) + log n) log(rank(A)) / eps^2); S = sqrt(n'/s) P H D with D a
///     diagonal of random signs (n x n), H the orthonormal Walsh-Hadamard matrix of size
///     n' = the next power of 2 >= n (A zero-padded to n' rows), P the s x n' selection of s rows
///     sampled uniformly without replacement (ascending). Time O(n' d log n'), memory O(n' d).
///     With s = n' no row is dropped and S^T S = I exactly: ||S A x|| = ||A x|| for every x.
///
/// S depends only on (kind, seed, n, s) (counter-based Philox draws), and Y is the same bit for
/// bit for any number of OpenMP threads: every output entry is computed by the same sequence of
/// floating-point operations whatever the schedule.
/// Requires A non-empty and finite, s >= 1, and for srht s <= n'. Throws Error(invalid_argument)
/// naming the argument ("matrix: ...", "s: ...") otherwise. No n x n or s x n matrix is formed.
DenseMatrix<double> sketch_rows(ConstMatrix A, index_t s, SketchKind kind, std::uint64_t seed);

/// G = (S A)^T (S A), d x d float64 row-major, for the same S as sketch_rows. CountSketch streams
/// blocks of rows of S A through DSYRK and never stores S A (O(nnz(A) + s d^2) time, O(block d)
/// memory); srht and gaussian form S A first. The same bits for any thread count.
std::vector<double> sketch_gram(ConstMatrix A, index_t s, SketchKind kind, std::uint64_t seed);

/// The same for a float64 matrix: A is n x d row-major with leading dimension ld >= d.
/// For the same (kind, seed, n, s), S is the same matrix as for float32 input.
DenseMatrix<double> sketch_rows(const double* A, index_t n, index_t d, index_t ld, index_t s,
                                SketchKind kind, std::uint64_t seed);

}  // namespace levattn
