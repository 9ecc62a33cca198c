"""levattn.integrations.flex.block_mask: flex_attention with the BlockMask equals lev_attention."""
import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from levattn.integrations.flex import block_mask
from levattn.torch import lev_attention

CASES = [dict(select="window:10+sinks:4"), dict(select="leverage:20"),
         dict(select="leverage:20+window:3+sinks:2"), dict(select="topk:8"), dict(select="full"),
         dict(select="leverage+eps:0.05", is_causal=True), dict(select="cluster:16+window:2"),
         dict(select="random:30+seed:3"), dict(select="topk:8", is_causal=True),
         dict(select="window:5", is_causal=True)]


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 600, 16) for _ in range(3))
    pad = torch.ones(2, 600, dtype=torch.bool)
    pad[1, 450:] = False
    return q, k, v, pad


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(str(x) for x in o.values()))
def test_flex_with_the_block_mask_equals_lev_attention(inputs, options, padded):
    q, k, v, pad = inputs
    mask = pad[:, None, None, :] if padded else None
    out, sel = lev_attention(q, k, v, attn_mask=mask, return_selection=True, **options)
    got = flex_attention(q, k, v, block_mask=block_mask(sel, block_size=64))
    torch.testing.assert_close(got, out, atol=2e-6, rtol=1e-5)


def test_block_aligned_window_lists_only_its_blocks(inputs):
    q, k, v, _ = inputs
    # keys |i - j| <= 63 plus sink 0: with blocks of 64, query block r reads blocks r-1 .. r+1 and 0.
    out, sel = lev_attention(q, k, v, select="window:63+sinks:1", return_selection=True)
    bm = block_mask(sel, block_size=64)
    counts = bm.kv_num_blocks[0, 0].tolist()
    blocks = (600 + 63) // 64
    assert counts == [min(r + 1, blocks - 1) - max(r - 1, 0) + 1 + (1 if r >= 2 else 0) for r in range(blocks)]
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=bm), out, atol=2e-6, rtol=1e-5)


def test_grouped_query_attention(inputs):
    q, k, v, _ = inputs
    q4 = torch.cat([q, q.flip(-1)], dim=1)
    out, sel = lev_attention(q4, k, v, enable_gqa=True, select="leverage:24", return_selection=True)
    got = flex_attention(q4, k, v, block_mask=block_mask(sel), enable_gqa=True)
    torch.testing.assert_close(got, out, atol=2e-6, rtol=1e-5)


def test_bad_arguments(inputs):
    q, k, v, _ = inputs
    _, sel = lev_attention(q, k, v, select="leverage:8+kernel:poly", return_selection=True)
    with pytest.raises(ValueError, match="softmax"):
        block_mask(sel)
    _, sel = lev_attention(q, k, v, select="leverage:8", return_selection=True)
    with pytest.raises(ValueError, match="block_size"):
        block_mask(sel, block_size=0)
    _, sel = lev_attention(q[0, 0], k[0, 0], v[0, 0], select="leverage:8", return_selection=True)
    with pytest.raises(ValueError, match="batch, heads"):
        block_mask(sel)
