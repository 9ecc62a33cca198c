"""Key-padding masks (attn_mask as scaled_dot_product_attention takes it, constant along the
queries): a masked key is never selected nor attended, by any selection; select="full" equals
SDPA with the same mask; gradients flow as through the dense masked computation."""
import math

import pytest
import torch
from torch.nn import functional as F

from levattn.torch import lev_attention

SELECTIONS = [
    dict(select="full"),
    dict(select="leverage:6+window:2+sinks:2"),
    dict(select="leverage+eps:0.05"),
    dict(select="topk:5"),
    dict(select="random:6+sinks:1+seed:4"),
    dict(select="window:3+sinks:2"),
    dict(select="cluster:4+window:1+sinks:1"),
    dict(select="leverage+eps:0.05+window:2+sinks:1", is_causal=True),
    dict(select="topk:5", is_causal=True),
    dict(select="full", is_causal=True),
]


def padding(batch, n, seed=0):
    """(batch, n) True where a key takes part: right padding in batch 0, left in 1, holes in 2."""
    keep = torch.ones(batch, n, dtype=torch.bool)
    keep[0, n - n // 3:] = False
    if batch > 1:
        keep[1, :n // 4] = False
    if batch > 2:
        keep[2, torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: n // 2]] = False
    return keep


def qkv(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    *lead, m, d = shape
    return tuple(torch.randn(*lead, rows, d, generator=g, dtype=dtype, requires_grad=True) for rows in (m, n, n))


@pytest.mark.parametrize("options", SELECTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_masked_keys_are_never_selected_or_attended(options):
    q, k, v = qkv((3, 2, 300, 8), 300, torch.float64, seed=1)
    keep = padding(3, 300)
    mask = keep[:, None, None, :]  # (batch, 1, 1, n): SDPA's key-padding form
    out, sel = lev_attention(q, k, v, mask, return_selection=True, **options)
    s = sel.to_selection()
    attended = torch.from_numpy(s.keys_per_query()).reshape(3, 2, 300)
    # No masked key in any set or query's keys; and the output ignores the masked keys' values.
    assert (sel.key_segments[~keep[:, None, :].expand(3, 2, 300)] == -1).all()
    own = sel.query_keys
    if own.shape[-1]:
        own_b = own.clamp(min=0)
        masked_own = ~torch.gather(keep[:, None, None, :].expand(3, 2, 300, 300), 3, own_b) & (own >= 0)
        assert not masked_own.any()
    v2 = v.detach().clone()
    v2[~keep[:, None, :].expand(3, 2, 300)] = 1e6
    k2 = k.detach().clone()
    k2[~keep[:, None, :].expand(3, 2, 300)] *= 50.0  # masked keys made heavy: still never chosen
    out2 = lev_attention(q.detach(), k2, v2, mask, **options)
    if options["select"].split("+")[0].split(":")[0] in ("full", "window", "topk"):
        torch.testing.assert_close(out2, out.detach())  # their choice does not read masked keys at all
    assert out2.abs().max() < 1e3
    assert (attended >= 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("form", ["bool", "additive", "2d"])
def test_full_selection_equals_sdpa_with_the_same_mask(causal, form):
    q, k, v = qkv((3, 4, 70, 16), 70, torch.float64, seed=2)
    keep = padding(3, 70)
    keep[:, 0] = True  # every causal row keeps a key (SDPA gives NaN for a row with none)
    mask = keep[:, None, None, :]
    if form == "additive":
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
    ref_mask = keep[:, None, None, :] & (torch.ones(70, 70, dtype=torch.bool).tril() if causal else True)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask)
    if form == "2d":  # one mask for the whole batch, (1, n)
        mask, ref = keep[:1, None, :].expand(1, 1, 70)[0], None
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[0][None, None, None, :] & (
            torch.ones(70, 70, dtype=torch.bool).tril() if causal else True))
    out = lev_attention(q, k, v, mask, select="full", is_causal=causal)
    torch.testing.assert_close(out, ref)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gq = torch.autograd.grad(out, (q, k, v), g)
    gr = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(gq, gr):
        torch.testing.assert_close(a, b)


def test_leverage_of_a_right_padded_batch_equals_leverage_of_its_prefix():
    q, k, v = qkv((2, 2, 200, 8), 200, torch.float32, seed=4)
    keep = torch.ones(2, 200, dtype=torch.bool)
    keep[1, 150:] = False
    _, sel = lev_attention(q, k, v, keep[:, None, None, :], select="leverage:12", return_selection=True)
    _, ref = lev_attention(q[1:, :, :150], k[1:, :, :150], v[1:, :, :150], select="leverage:12",
                           return_selection=True)
    assert torch.equal(sel.key_segments[1, :, :150], ref.key_segments[0])


@pytest.mark.parametrize("options", SELECTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_a_sequence_of_padding_only_attends_nothing(options):
    q, k, v = qkv((2, 2, 40, 4), 40, torch.float32, seed=6)
    keep = torch.ones(2, 40, dtype=torch.bool)
    keep[1] = False  # batch 1 is all padding: each of its queries has no key and gets 0
    out = lev_attention(q, k, v, keep[:, None, None, :], **options)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    torch.testing.assert_close(out[0], lev_attention(q[:1], k[:1], v[:1], **options)[0])
    out.sum().backward()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()


def test_gradcheck_with_a_mask():
    q, k, v = qkv((2, 2, 9, 4), 11, torch.float64, seed=5)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[0, 8:] = False
    keep[1, :2] = False
    for options in (dict(select="full"), dict(select="leverage:4+window:1"), dict(select="topk:3")):
        assert torch.autograd.gradcheck(lambda a, b, c: lev_attention(a, b, c, keep[:, None, None, :], **options),
                                        (q, k, v))


@pytest.mark.parametrize("mask, text", [
    (torch.ones(3, 2, 40, 40, dtype=torch.bool), "key-padding"),
    (torch.ones(3, 1, 1, 41, dtype=torch.bool), "keys"),
    (torch.ones(5, 1, 1, 40, dtype=torch.bool), "batch"),
    (torch.full((3, 1, 1, 40), 0.5), "0 \\(attend\\) or -inf"),
    (torch.ones(3, 2, 1, 40, dtype=torch.bool), "heads"),
    (torch.ones(3, 1, 1, 40, dtype=torch.int32), "dtype"),
])
def test_bad_masks_are_value_errors(mask, text):
    q, k, v = qkv((3, 2, 40, 4), 40, torch.float32)
    with pytest.raises(ValueError, match=text):
        lev_attention(q, k, v, mask, select="full")
