"""levattn.torch: LevAttention as a PyTorch 2 custom op, and a drop-in self-attention module.

``lev_attention`` follows ``torch.nn.functional.scaled_dot_product_attention``'s conventions
(``scale``, ``is_causal``) and calls the op ``torch.ops.levattn.attention``, a
``torch.library.custom_op`` whose forward and backward run in the C++ library: the selection of
keys is made once in the forward pass and returned as fixed-size integer tensors (so every shape
is known before the data is), which the backward reads back. The gradients flow to q, k and v
through the selected entries, exactly as autograd through the dense masked computation gives
them, with no n x n buffer. The op has a fake (meta) implementation and its autograd formula
registered, so ``torch.compile(model, fullgraph=True)`` traces models that use it, forward and
backward, with no graph break.
"""
import math
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import _core

__all__ = ["lev_attention", "LevSelfAttention", "SelectedKeys"]

_FLOATS = (torch.float32, torch.float64)
_COMPUTED_IN_FLOAT32 = (torch.bfloat16, torch.float16)


# -- the selection spec ---------------------------------------------------------------------------

def _spec(select, function, retired):
    """The selection spec a call names: `select`, a string (checked by the op, so that this stays
    plain Python that torch.compile folds); the keywords of old are a TypeError with their spec."""
    if retired:
        _core.refuse_selection_keywords(function, select if isinstance(select, str) else "full", retired)
    if not isinstance(select, str):
        raise ValueError(f"select: expected a selection spec string such as 'leverage:32+window:4', got "
                         f"{type(select).__name__}")
    return select


# -- the op ---------------------------------------------------------------------------------------

def _numpy(t):
    """A numpy view of a CPU tensor, made contiguous (and float32 for half types) first."""
    if t.dtype in _COMPUTED_IN_FLOAT32:
        t = t.float()
    return t.detach().contiguous().numpy()


def _shape(q, k, v):
    """(batch, heads, m, n, d, dv, kv_heads) of q (.., m, d), k (.., n, d), v (.., n, dv)."""
    lead = q.shape[:-2]
    batch = lead[0] if len(lead) == 2 else 1
    heads = lead[-1] if len(lead) >= 1 else 1
    kv_heads = k.shape[-3] if k.dim() >= 3 else 1
    return (batch, heads, q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1], kv_heads)


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _open_keys(key_mask):
    """The op's key mask as numpy (batch, n) bool: True where a key may be attended."""
    if key_mask is None:
        return None
    if key_mask.dtype == torch.bool:
        return key_mask.contiguous().numpy()
    keep, closed = key_mask == 0, key_mask == -math.inf
    if not bool((keep | closed).all()):
        raise ValueError("attn_mask: an additive (float) mask must hold 0 (attend) or -inf (masked) only; "
                         "other biases are not supported")
    return keep.contiguous().numpy()


@torch.library.custom_op("levattn::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor], spec: str,
                  scale: Optional[float], causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    out, stat, segs, own, sampled, weight = _core.op_forward(_numpy(q), _numpy(k), _numpy(v), _open_keys(key_mask),
                                                             spec, scale, causal)
    return (torch.from_numpy(out).to(q.dtype), torch.from_numpy(stat), torch.from_numpy(segs),
            torch.from_numpy(own), torch.from_numpy(sampled), torch.from_numpy(weight))


@_attention_op.register_fake
def _attention_fake(q, k, v, key_mask, spec, scale, causal):
    layout = _core.selection_layout(spec, scale, causal, tuple(int(x) for x in _shape(q, k, v)))
    lead, m, n = q.shape[:-2], q.shape[-2], k.shape[-2]
    return (q.new_empty((*lead, m, v.shape[-1])), q.new_empty((*lead, m), dtype=_stat_dtype(q.dtype)),
            q.new_empty((*lead, n), dtype=torch.int64), q.new_empty((*lead, m, layout.top_k), dtype=torch.int64),
            q.new_empty((*lead, layout.residual_blocks, layout.residual), dtype=torch.int64),
            q.new_empty((*lead, layout.residual_blocks), dtype=torch.float64))


@torch.library.custom_op("levattn::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, stat: torch.Tensor, key_segments: torch.Tensor,
                           query_keys: torch.Tensor, residual_keys: torch.Tensor, residual_weight: torch.Tensor,
                           key_mask: Optional[torch.Tensor], spec: str,
                           scale: Optional[float], causal: bool, need_dq: bool, need_dk: bool,
                           need_dv: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _core.op_backward(_numpy(q), _numpy(k), _numpy(v), _numpy(out), _numpy(stat), _numpy(grad_out),
                              _numpy(key_segments), _numpy(query_keys), _numpy(residual_keys),
                              _numpy(residual_weight), _open_keys(key_mask), spec, scale, causal,
                              need_dq, need_dk, need_dv)
    # A gradient not asked for is an empty tensor (the op's outputs cannot be None).
    return tuple(x.new_empty(0) if g is None else torch.from_numpy(g).to(x.dtype) for g, x in zip(grads, (q, k, v)))


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, q, k, v, out, stat, key_segments, query_keys, residual_keys, residual_weight,
                             key_mask, spec, scale, causal, need_dq, need_dk, need_dv):
    return tuple(x.new_empty(x.shape) if need else x.new_empty(0) for x, need in ((q, need_dq), (k, need_dk), (v, need_dv)))


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, spec, scale, causal = inputs
    out, stat, segs, own, sampled, weight = output
    ctx.save_for_backward(q, k, v, out, stat, segs, own, sampled, weight, key_mask)
    ctx.spec, ctx.scale, ctx.causal = spec, scale, causal


def _backward(ctx, grad_out, grad_stat, grad_segs, grad_own, grad_sampled, grad_weight):
    q, k, v, out, stat, segs, own, sampled, weight, key_mask = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = torch.ops.levattn.attention_backward(grad_out, q, k, v, out, stat, segs, own, sampled, weight, key_mask,
                                                 ctx.spec, ctx.scale, ctx.causal, *need)
    # stat is internal (lev_attention never returns it), so no gradient reaches it.
    return tuple(g if n else None for g, n in zip(grads, need)) + (None, None, None, None)


_attention_op.register_autograd(_backward, setup_context=_setup_context)


# -- the user's functions -------------------------------------------------------------------------

class SelectedKeys(NamedTuple):
    """The selection of one lev_attention call as fixed-size tensors (shapes known before the data).

    key_segments (.., n) int64: for each key, the last segment of queries whose shared set holds
    it, -1 when none does (one segment unless causal leverage, whose sets change every 256
    queries); query_keys (.., m, top_k) int64: each query's own keys (topk, cluster), -1 for an
    unused slot; residual_keys (.., blocks, residual) int64 and residual_weight (.., blocks)
    float64: with +residual:R, the keys sampled from the rest of each block of 256 queries and their
    weight (1 without). The window band and `all keys` (select="full") follow from the options.
    ``to_selection()`` gives the levattn.Selection (eager code only: it leaves the graph).
    """
    key_segments: torch.Tensor
    query_keys: torch.Tensor
    key_mask: Optional[torch.Tensor]
    spec: str
    scale: Optional[float]
    causal: bool
    shape: tuple
    residual_keys: Optional[torch.Tensor] = None
    residual_weight: Optional[torch.Tensor] = None

    def to_selection(self):
        blocks = _core.selection_layout(self.spec, self.scale, self.causal, tuple(self.shape)).residual_blocks
        lead = tuple(self.query_keys.shape[:-2])
        sampled = self.residual_keys if self.residual_keys is not None else \
            torch.empty((*lead, blocks, 0), dtype=torch.int64)
        weight = self.residual_weight if self.residual_weight is not None else \
            torch.ones((*lead, blocks), dtype=torch.float64)
        return _core.selection_from_arrays(self.key_segments.numpy(), self.query_keys.numpy(), sampled.numpy(),
                                           weight.detach().numpy(), _open_keys(self.key_mask), self.spec, self.scale,
                                           self.causal, self.shape)


def _check(name, t):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: levattn has CPU kernels only; got a tensor on {t.device} (move it with .cpu())")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in _FLOATS + _COMPUTED_IN_FLOAT32:
        raise ValueError(f"{name}: expected dtype float32, float64, bfloat16 or float16, got {t.dtype}")
    if t.dim() not in (2, 3, 4):
        raise ValueError(f"{name}: expected shape (n, d), (heads, n, d) or (batch, heads, n, d), got {tuple(t.shape)}")


def _key_padding(mask, query, key):
    """attn_mask as scaled_dot_product_attention takes it, if it is a key-padding mask (size 1
    along the queries and the heads): as (batch, n), bool (True: attend) or float (0 / -inf)."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attn_mask: expected a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attn_mask: expected dtype bool (True: attend) or an additive float mask, got {mask.dtype}")
    if mask.device.type != "cpu":
        raise ValueError(f"attn_mask: expected a CPU tensor, got one on {mask.device}")
    n, dims = key.shape[-2], query.dim()
    if not 1 <= mask.dim() <= dims:
        raise ValueError(f"attn_mask: expected at most {dims} dimensions (broadcast against the query's), got shape "
                         f"{tuple(mask.shape)}")
    shape = (1,) * (dims - mask.dim()) + tuple(mask.shape)
    if shape[-1] != n:
        raise ValueError(f"attn_mask: expected {n} keys in its last dimension, got shape {tuple(mask.shape)}")
    if shape[-2] != 1:
        raise ValueError(f"attn_mask: only key-padding masks are taken (size 1 along the queries, one mask row for all "
                         f"of them), got shape {tuple(mask.shape)}; use is_causal for causal masking")
    if dims >= 3 and shape[-3] != 1:
        raise ValueError(f"attn_mask: a mask per head is not taken (size 1 along the heads), got shape "
                         f"{tuple(mask.shape)}")
    batch = query.shape[0] if dims == 4 else 1
    if dims == 4 and shape[0] not in (1, batch):
        raise ValueError(f"attn_mask: batch {shape[0]} against the query's {batch}")
    return mask.reshape(shape[0] if dims == 4 else 1, n).expand(batch, n).contiguous()


def lev_attention(query, key, value, attn_mask=None, *, is_causal=False, scale=None, enable_gqa=False,
                  select="leverage", return_selection=False, **retired):
    """Attention of each query over its selected keys, differentiable in query, key and value.

    query (.., m, d), key (.., n, d), value (.., n, dv) with .. = (), (heads,) or (batch, heads):
    CPU tensors of one dtype. float32 and float64 are computed in their own precision; bfloat16
    and float16 in float32 (the output and the gradients are rounded to the input dtype once, at
    the end); `+precision:bf16` in `select` rounds the forward's products' inputs to bfloat16 where
    the CPU has AVX512_BF16 (levattn.build_info()["bf16"]), with float32 sums. Returns out (.., m, dv) in the input dtype, and with return_selection=True
    (out, SelectedKeys).

    As in scaled_dot_product_attention: scale (default 1/sqrt(d) for softmax, 1 for poly),
    is_causal (query i attends keys 0 .. i only, m == n, in every selection and its gradients) and
    enable_gqa (key and value with fewer heads than query, dividing them: query head h reads kv
    head h // (heads / kv_heads) in place, no copy; their gradients are summed over the group).
    attn_mask: a key-padding mask as SDPA takes it (broadcastable to (batch, heads, m, n) with
    size 1 along the heads and the queries: (batch, 1, 1, n), (n,), ...), bool (True: the key
    takes part) or additive float (0 or -inf): a masked key is never selected, by any selection,
    nor attended (sinks are then the first unmasked keys); a query with no key left gets 0 (SDPA
    gives NaN). Other masks are a ValueError.

    select: the selection spec, as ``levattn.attention`` and ``levattn attend --select`` take it:
    "leverage:32" (the 32 keys of largest leverage score; "leverage+eps:0.05" the universal set
    U_eps; with +kernel:poly+p:P and P != 2 by |x|^p sensitivity bounds), "full" (every key:
    exact attention), "topk:32" (per query its top keys by f(s): the exact oracle, O(m n d)),
    "random:32" (+seed:S), "window:16" (keys |i - j| <= 16) or "cluster:32" (per query its top keys
    among its nearest k-means clusters: query-aware, sub-quadratic; +probe, +clusters,
    +iterations; +eps adds U_eps), each with +window:W and +sinks:S (keys 0 .. S-1) added;
    +kernel:poly+p:P for |s|^p normalised over the selection; +residual:R to estimate what the
    selection drops from R keys per block of 256 queries sampled from the rest, each weighted |U| / R
    (unbiased normaliser and numerator, math.md 1.8); +budget_alpha:A+budget_exponent:C for
    the n^C-adaptive budget ceil(A n^C); the leverage score fields (+method:sketch+sketch_size:N,
    ...). ``levattn.parse_selection`` gives a spec's canonical form. With is_causal,
    "leverage+eps:E" uses each block's causal universal set, made from keys before the block only,
    so no output depends on a later key (cluster trains its k-means on all keys: its choice of
    earlier keys can). The keywords of old (top_k=, window=, ...) are a TypeError giving their spec.

    The selection is a discrete choice made in the forward pass from query and key (rounded to
    float32 for it). Cost per (batch, head): selection O(n d^2) (leverage), attention
    O(m |S| (d + dv)), backward 1.4-2.6x the forward (docs/benchmarks.md); memory O(m + n +
    |S| (d + dv)) beyond the inputs and outputs, and for the backward's fixed-order sums at most
    max(64 MiB, the size of the key and value gradients) more. Raises ValueError for CUDA tensors, other dtypes, bad shapes, NaN/Inf or
    bad options.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check(name, t)
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query, key, value: expected one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    key_mask = None if attn_mask is None else _key_padding(attn_mask, query, key)
    if query.dim() >= 3 and key.dim() == query.dim() and key.shape[-3] != query.shape[-3] and not enable_gqa:
        raise ValueError(f"key: {key.shape[-3]} heads against the query's {query.shape[-3]}; pass enable_gqa=True "
                         "for grouped-query attention")
    spec = _spec(select, "lev_attention", retired)
    scale = None if scale is None else float(scale)
    out, _, segs, own, sampled, weight = torch.ops.levattn.attention(query, key, value, key_mask, spec, scale,
                                                                     bool(is_causal))
    if return_selection:
        # The weights are data of the selection, not a function of the inputs to differentiate.
        return out, SelectedKeys(segs, own, key_mask, spec, scale, bool(is_causal), _shape(query, key, value), sampled,
                                 weight.detach())
    return out


class LevSelfAttention(nn.Module):
    """Multi-head self-attention over LevAttention's selection: a drop-in for
    ``torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`` used as self-attention.

    Input x (batch, n, embed_dim) (or (n, embed_dim)); output of the same shape. The parameters
    have MultiheadAttention's names and shapes (in_proj_weight, in_proj_bias, out_proj), so its
    state_dict loads as it is; select="full" then reproduces it. The selection spec, the scale and
    is_causal are attributes (``module.select = "topk:32"``) so that a trained model can be
    evaluated with another selection. Each head attends with ``lev_attention``; see it for the spec.
    """

    def __init__(self, embed_dim, num_heads, *, select="leverage", scale=None, is_causal=False, bias=True,
                 device=None, dtype=None, **retired):
        super().__init__()
        select = _spec(select, "LevSelfAttention", retired)
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.select, self.scale, self.is_causal = select, scale, is_causal
        self.reset_parameters()

    def reset_parameters(self):
        """MultiheadAttention's initialisation: Xavier-uniform projections, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def options(self):
        """The lev_attention keywords this module uses now."""
        return dict(select=self.select, scale=self.scale, is_causal=self.is_causal)

    def forward(self, x, return_selection=False):
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected shape (batch, n, {self.embed_dim}), got {tuple(x.shape)}")
        b, n, e = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = lev_attention(q, k, v, return_selection=return_selection, **self.options())
        out, selection = out if return_selection else (out, None)
        y = self.out_proj(out.transpose(1, 2).reshape(b, n, e))
        y = y.squeeze(0) if unbatched else y
        return (y, selection) if return_selection else y

    def extra_repr(self):
        o = {k: v for k, v in self.options().items() if v is not None}
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, " + ", ".join(f"{k}={v!r}" for k, v in o.items())
