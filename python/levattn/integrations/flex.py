"""A FlexAttention BlockMask from a levattn selection.

``flex_attention(q, k, v, block_mask=block_mask(selection), scale=...)`` attends exactly the keys
levattn selected (``lev_attention(..., return_selection=True)``), softmax kernel: the block mask
lists, per block of queries, the key blocks that hold a selected key (built with
``BlockMask.from_kv_blocks`` from the selection's per-key and per-query arrays, never from an
(m, n) mask), and its mask_mod keeps the selected entries inside those blocks.

When it helps: FlexAttention computes whole (block_size x block_size) tiles, so its cost is the
number of listed blocks. Block-sparse selections (the window band, sinks, keys in runs) touch
few blocks per query block and run at the speed of the compiled kernel. Scattered selections
(leverage or top-k keys spread over the sequence) touch most blocks: FlexAttention then does
nearly dense work, and gathering the selected keys, as lev_attention does, is the fast way
(docs/benchmarks.md, "PyTorch 2").
"""
from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

from .. import _core

__all__ = ["block_mask"]


def _blocks(count, size):
    return (count + size - 1) // size


def _shared_blocks(layout, segs, m, n, block_size):
    """(batch, heads, q_blocks, kv_blocks) bool: query block r may read key block c through the
    shared sets. Key j is in the sets of segments first(j) .. segs[j] (first(j) = j // segment
    under causal attention, 0 otherwise); a key block is listed for the query blocks whose
    segments meet the union of its keys' runs (a superset; the mask_mod is exact)."""
    b, h = segs.shape[:2]
    qb, kb = _blocks(m, block_size), _blocks(n, block_size)
    pad = kb * block_size - n
    last = torch.nn.functional.pad(segs, (0, pad), value=-1).reshape(b, h, kb, block_size)
    if layout.segment == 0:
        return (last >= 0).any(-1)[:, :, None, :].expand(b, h, qb, kb)
    j = torch.arange(kb * block_size).reshape(kb, block_size)
    first = torch.where(last >= 0, (j // layout.segment if layout.causal else 0).expand_as(last),
                        torch.iinfo(torch.int64).max)
    lo, hi = first.min(-1).values, last.max(-1).values  # (b, h, kb)
    rows = torch.arange(qb)
    s_lo = rows * block_size // layout.segment
    s_hi = (torch.clamp((rows + 1) * block_size, max=m) - 1) // layout.segment
    return (lo[:, :, None, :] <= s_hi[:, None]) & (hi[:, :, None, :] >= s_lo[:, None])


def _window_blocks(w, m, n, block_size, causal):
    """(q_blocks, kv_blocks) bool: the key blocks the band |i - j| <= w reaches from each query block."""
    qb, kb = _blocks(m, block_size), _blocks(n, block_size)
    rows, cols = torch.arange(qb)[:, None], torch.arange(kb)[None, :]
    q_first, q_last = rows * block_size, torch.clamp((rows + 1) * block_size, max=m) - 1
    k_first, k_last = cols * block_size, torch.clamp((cols + 1) * block_size, max=n) - 1
    high = q_last if causal else q_last + w
    return (k_last >= q_first - w) & (k_first <= high)


def _own_blocks(own, m, n, block_size):
    """(batch, heads, q_blocks, kv_blocks) bool: the key blocks holding some query's own keys."""
    b, h, _, top_k = own.shape
    qb, kb = _blocks(m, block_size), _blocks(n, block_size)
    out = torch.zeros(b, h, qb, kb + 1, dtype=torch.bool)
    rows = (torch.arange(m) // block_size)[:, None].expand(m, top_k)
    cols = torch.where(own >= 0, own // block_size, kb)  # unused slots land in the extra column
    out.index_put_((torch.arange(b)[:, None, None], torch.arange(h)[None, :, None],
                    rows.reshape(-1)[None, None].expand(b, h, -1), cols.reshape(b, h, -1)),
                   torch.ones((), dtype=torch.bool))
    return out[..., :kb]


def block_mask(selection, block_size: int = 128) -> BlockMask:
    """A BlockMask for ``torch.nn.attention.flex_attention`` equal to `selection` (a
    levattn.torch.SelectedKeys from ``lev_attention(..., return_selection=True)`` on inputs with
    batch and head dimensions): flex_attention with it and the same scale gives lev_attention's
    output (softmax kernel), every selection, causal or not, with key padding and grouped-query
    attention (query heads; pass enable_gqa=True to flex_attention then).

    Cost O(batch heads (n + m top_k + q_blocks kv_blocks)) time and memory, q_blocks = ceil(m /
    block_size), kv_blocks = ceil(n / block_size). ValueError for the poly kernel (flex_attention
    computes softmax), a selection with +residual (its sampled keys carry weights), inputs without
    batch and head dimensions, or block_size < 1.
    """
    if int(block_size) < 1:
        raise ValueError(f"block_size: expected an integer >= 1, got {block_size}")
    batch, heads, m, n = selection.shape[:4]
    segs, own = selection.key_segments, selection.query_keys
    if segs.dim() != 3:
        raise ValueError(f"selection: expected a selection of inputs (batch, heads, n, d), got key_segments of shape "
                         f"{tuple(segs.shape)}")
    layout = _core.selection_layout(selection.spec, selection.scale, selection.causal, tuple(selection.shape))
    if layout.residual > 0:
        raise ValueError(f"selection: a residual part weights each query's sampled keys, which a block mask cannot "
                         f"carry ({selection.spec})")
    if "+kernel:poly" in _core.parse_selection(selection.spec):
        raise ValueError(f"selection: flex_attention computes softmax attention; this selection's kernel is poly "
                         f"({selection.spec})")
    qb, kb = _blocks(m, block_size), _blocks(n, block_size)
    listed = torch.zeros(batch, heads, qb, kb, dtype=torch.bool)
    if layout.all_keys:
        listed[:] = True
    else:
        listed |= _shared_blocks(layout, segs, m, n, block_size)
        if layout.window >= 0:
            listed |= _window_blocks(layout.window, m, n, block_size, layout.causal)
        if own.shape[-1] > 0:
            listed |= _own_blocks(own, m, n, block_size)
    if layout.causal:
        listed &= torch.ones(qb, kb, dtype=torch.bool).tril()
    kv_num = listed.sum(-1, dtype=torch.int32)
    kv_indices = torch.argsort(listed.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    mask_mod = _entry_mask(layout, segs, own, selection.key_mask)
    return BlockMask.from_kv_blocks(kv_num, kv_indices, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(m, n))


def _entry_mask(layout, segs, own, key_mask):
    """mask_mod(b, h, q, kv): whether the selection attends entry (q, kv)."""
    segment, window, causal, all_keys = layout.segment, layout.window, layout.causal, layout.all_keys
    has_own = own.shape[-1] > 0

    def mask_mod(b, h, q, kv):
        if all_keys:
            keep = kv >= 0
        else:
            last = segs[b, h, kv]
            if segment == 0:
                keep = last >= 0
            else:
                s = q // segment
                first = kv // segment if causal else 0
                keep = (last >= s) & (first <= s)
            if window >= 0:
                keep = keep | ((q - kv).abs() <= window)
            if has_own:
                keep = keep | (own[b, h, q] == kv).any()
        if causal:
            keep = keep & (kv <= q)
        if key_mask is not None:
            keep = keep & key_mask[b, kv]
        return keep

    return mask_mod
