"""levattn.torch: LevAttention as a differentiable PyTorch op, and a drop-in self-attention module.

``lev_attention`` is a ``torch.autograd.Function`` whose forward and backward run in the C++
library (``levattn.select_keys``, ``levattn.attention_forward``, ``levattn.attention_backward``):
the selection of keys is made once in the forward pass and saved; the gradients flow to q, k and
v through the selected entries, exactly as autograd through the dense masked computation gives
them, with no n x n buffer (the backward recomputes the selected logits by tiles).
"""
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from . import _core

__all__ = ["lev_attention", "LevSelfAttention"]


def _array(name, t):
    """A zero-copy numpy view of a CPU tensor (contiguous first if it is not)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: levattn has CPU kernels only; got a tensor on {t.device} (move it with .cpu())")
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: expected dtype float32 or float64, got {t.dtype}")
    if t.dim() not in (2, 3, 4):
        raise ValueError(f"{name}: expected shape (n, d), (heads, n, d) or (batch, heads, n, d), got {tuple(t.shape)}")
    return t.detach().contiguous().numpy()


class _LevAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, options, holder):
        qn, kn, vn = _array("q", q), _array("k", k), _array("v", v)
        if not (q.dtype == k.dtype == v.dtype):
            raise ValueError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
        select = options["select"]
        kernel = {key: options[key] for key in ("kernel", "p", "scale")}
        # The selection is made from float32 q and k (a float64 call rounds them for it only).
        q32 = qn if qn.dtype.itemsize == 4 else qn.astype("float32")
        k32 = kn if kn.dtype.itemsize == 4 else kn.astype("float32")
        selection = _core.select_keys(q32, k32, **select, **kernel)
        out, stat = _core.attention_forward(qn, kn, vn, selection, **kernel)
        out, stat = torch.from_numpy(out), torch.from_numpy(stat)
        # The inputs themselves (autograd then notices in-place changes before the backward).
        ctx.save_for_backward(q, k, v, out, stat)
        ctx.selection, ctx.kernel = selection, kernel
        if holder is not None:
            holder.append(selection)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, out, stat = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _core.attention_backward(
            _array("q", q), _array("k", k), _array("v", v), out.numpy(), stat.numpy(), _array("grad_out", grad_out),
            ctx.selection, need_dq=need[0], need_dk=need[1], need_dv=need[2], **ctx.kernel)
        return tuple(None if g is None else torch.from_numpy(g) for g in grads) + (None, None)


def lev_attention(q, k, v, *, select="leverage", top_k=None, eps=None, window=None, sinks=0,
                  kernel="softmax", p=2.0, scale=None, seed=0, budget_alpha=0.0, budget_exponent=0.0,
                  leverage=None, cluster=None, causal=False, return_selection=False):
    """Attention of each query over its selected keys, differentiable in q, k and v.

    q (.., m, d), k (.., n, d), v (.., n, dv) with .. = (), (heads,) or (batch, heads): CPU
    tensors of one dtype, float32 or float64. Returns out (.., m, dv) of that dtype, and with
    return_selection=True (out, levattn.Selection).

    select: "leverage" (top_k keys by leverage score, or the universal set U_eps for eps in
    (0, 1]; with the poly kernel and p != 2 by |x|^p sensitivity bounds), "full" (every key),
    "topk" (per query its top_k keys by f(s): the exact oracle, O(m n d)), "random" (top_k keys per
    (batch, head) by seed), "window" (window and sinks only) or "cluster" (per query its top_k keys
    among the keys of its nearest k-means clusters: query-aware, sub-quadratic; settings in
    cluster=levattn.ClusterOptions(...), eps adds U_eps). window=w adds keys |i - j| <= w, sinks=s
    keys 0 .. s-1 (leverage, random, window, cluster). kernel: "softmax" (exp(s), scale 1/sqrt(d))
    or "poly" (|s|^p normalised over the selection, scale 1). budget_alpha / budget_exponent: the
    n^C-adaptive budget top_k = ceil(alpha n^C). leverage: a levattn.LeverageOptions.
    causal=True: query i attends keys 0 .. i only (m == n), in every selection and in the
    gradients; select="leverage" then takes eps and uses each block's causal universal set, made
    from keys before the block only, so no output depends on a later key (cluster trains its
    k-means on all keys: its choice of earlier keys can).

    The selection is a discrete choice made in the forward pass from q and k (rounded to float32
    for it); the output and gradients are computed in the inputs' dtype. Cost per (batch, head):
    selection O(n d^2) (leverage), attention O(m |S| (d + dv)), backward 2.5-4x the forward;
    memory O(m + |S| (d + dv)) beyond the inputs and outputs.
    Raises ValueError for CUDA tensors, other dtypes, bad shapes, NaN/Inf or bad options.
    """
    options = {
        "select": dict(select=select, top_k=top_k, eps=eps, window=window, sinks=sinks, seed=seed,
                       budget_alpha=budget_alpha, budget_exponent=budget_exponent, leverage=leverage,
                       cluster=cluster, causal=causal),
        "kernel": kernel, "p": p, "scale": scale,
    }
    holder = [] if return_selection else None
    out = _LevAttention.apply(q, k, v, options, holder)
    return (out, holder[0]) if return_selection else out


class LevSelfAttention(nn.Module):
    """Multi-head self-attention over LevAttention's selection: a drop-in for
    ``torch.nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)`` used as self-attention.

    Input x (batch, n, embed_dim) (or (n, embed_dim)); output of the same shape. The parameters
    have MultiheadAttention's names and shapes (in_proj_weight, in_proj_bias, out_proj), so its
    state_dict loads as it is; select="full" then reproduces it. The selection options are
    attributes (``module.select = "topk"``...) so that a trained model can be evaluated with
    another selection. Each head attends with ``lev_attention``; see it for the options.
    """

    def __init__(self, embed_dim, num_heads, *, select="leverage", top_k=None, eps=None, window=None,
                 sinks=0, kernel="softmax", p=2.0, scale=None, seed=0, leverage=None, cluster=None,
                 causal=False, bias=True, device=None, dtype=None):
        super().__init__()
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
        self.select, self.top_k, self.eps, self.window, self.sinks = select, top_k, eps, window, sinks
        self.kernel, self.p, self.scale, self.seed, self.leverage = kernel, p, scale, seed, leverage
        self.cluster, self.causal = cluster, causal
        self.reset_parameters()

    def reset_parameters(self):
        """MultiheadAttention's initialisation: Xavier-uniform projections, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def options(self):
        """The lev_attention keywords this module uses now."""
        return dict(select=self.select, top_k=self.top_k, eps=self.eps, window=self.window, sinks=self.sinks,
                    kernel=self.kernel, p=self.p, scale=self.scale, seed=self.seed, leverage=self.leverage,
                    cluster=self.cluster, causal=self.causal)

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
        o = {k: v for k, v in self.options().items() if v is not None and k not in ("leverage", "cluster")}
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, " + ", ".join(f"{k}={v!r}" for k, v in o.items())
