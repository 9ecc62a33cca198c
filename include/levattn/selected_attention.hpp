// levattn/selected_attention.hpp: attention over a fixed selection of keys, with its gradients.
// The selection is a discrete choice (select_keys); given it, attention is a smooth function of
// Q, K and V, and selected_attention_backward gives the gradients exactly as autograd through
// the dense masked computation would, without an n x n buffer (docs/design.md, "Gradients").
#pragma once
#include "levattn/options.hpp"
#include "levattn/selection.hpp"

namespace levattn {

/// Attention over a given selection with the kernel's kernel, p and scale.
///
/// Writes with g(s) = s (softmax) or g(s) = p log|s| (power, g(0) = -inf), s = scale q_i.k_j:
///   out_i  = sum_{j in S_i} exp(g(s_ij) - L_i) v_j              (dv wide)
///   stat_i = L_i = log sum_{j in S_i} exp(g(s_ij))              (+inf for an empty row, whose out is 0)
/// which is softmax over S_i, or |s|^p / sum |s|^p. Buffers: out (pairs, m, dv), stat (pairs, m).
/// Cost O(m |S| (d + dv)) time (dense products by key tiles), O(tile * (d + dv)) workspace per
/// thread. T is float or double; every sum is formed in T (float: log-sum-exp in double).
/// Throws Error(invalid_argument) on shapes that do not match the selection, an inconsistent
/// selection, non-finite inputs, or logits / outputs that overflow T.
template <class T>
void selected_attention_forward(const AttentionShape& shape, const Selection& selection,
                                const KernelOptions& kernel, const T* q, const T* k, const T* v,
                                T* out, T* stat);

/// Gradients of sum(dout * out) for out = selected_attention_forward(...) with the same
/// selection and kernel, from the saved out and stat (FlashAttention-2 style: the selected
/// logits are recomputed by tiles, never an n x n buffer):
///   P_ij = exp(g(s_ij) - L_i),  delta_i = dout_i . out_i,
///   dS_ij = P_ij g'(s_ij) (dout_i . v_j - delta_i)   (g' = 1, or p / s; 0 at s = 0),
///   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij dout_i.
/// Buffers: dq (pairs, m, d), dk (batch * kv, n, d), dv (batch * kv, n, dv), each nullable (not
/// computed); written whole (keys no query attends get 0). Each (query tile, key block) is met
/// once, in 5 tile products against the forward's 2 (measured 2.1-2.7x the forward's time,
/// docs/benchmarks.md). A pair's query tiles run in chunks (16 tasks in all where the pairs are
/// fewer); each chunk after a pair's first sums its dK and dV in a partial buffer over the keys
/// its tiles meet, and the partials are added in chunk order (then over a kv head's query heads
/// in ascending order), so the result does not depend on the thread count. Workspace: the
/// partials, at most max(64 MiB, the size of dK + dV); grouped shapes (pairs, n, d + dv) more;
/// per thread a tile's buffers and the widest shared set's rows. Throws as the forward does,
/// and on non-finite dout.
template <class T>
void selected_attention_backward(const AttentionShape& shape, const Selection& selection,
                                 const KernelOptions& kernel, const T* q, const T* k, const T* v,
                                 const T* out, const T* stat, const T* dout, T* dq, T* dk, T* dv);

}  // namespace levattn
