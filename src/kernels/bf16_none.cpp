// kernels/bf16_none.cpp: builds without the x86-64 kernels have no bfloat16 products.
#include "kernels/bf16.hpp"

#include "detail/require.hpp"

namespace levattn::kernels {

bool bf16_available() { return false; }

namespace {
[[noreturn]] void unavailable() {
  detail::fail(ErrorKind::internal, "bf16", "bfloat16 products are not built for this CPU");
}
}  // namespace

void bf16_pairs_along_rows(const float*, index_t, index_t, index_t, std::uint32_t*) { unavailable(); }
void bf16_pairs_down_columns(const float*, index_t, index_t, index_t, std::uint32_t*) { unavailable(); }
void bf16_pairs_transposed(const float*, index_t, index_t, index_t, std::uint32_t*) { unavailable(); }
void bf16_gemm(index_t, index_t, index_t, float, float, const std::uint32_t*, index_t, const std::uint32_t*, index_t,
               float*, index_t) {
  unavailable();
}

}  // namespace levattn::kernels
