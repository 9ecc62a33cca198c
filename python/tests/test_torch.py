"""levattn.torch against dense masked PyTorch autograd, gradcheck, and nn.MultiheadAttention."""
import math

import pytest
import torch

import levattn
from levattn.torch import LevSelfAttention, SelectedKeys, lev_attention

SELECTIONS = ["full", "leverage:6+window:2+sinks:1", "leverage+eps:0.035", "topk:5", "random:6+seed:4",
              "window:3+sinks:2", "cluster:4+window:1+sinks:1"]
KERNELS = [dict(kernel="softmax"), dict(kernel="poly", p=2.0), dict(kernel="poly", p=3.5)]
CAUSAL = ["full", "leverage+eps:0.05+window:2+sinks:1", "topk:5", "random:6+seed:4", "window:3+sinks:2",
          "cluster:4+window:1"]


def with_kernel(spec, kern):
    """The spec of a selection under a kernel (dense_masked's keywords)."""
    return spec if kern["kernel"] == "softmax" else f"{spec}+kernel:poly+p:{kern['p']}"


def mask_of(sel):
    """The (pairs, m, n) mask of a levattn.Selection (or SelectedKeys): True where query i attends key j."""
    if isinstance(sel, SelectedKeys):
        sel = sel.to_selection()
    pairs = sel.batch * sel.heads
    i = torch.arange(sel.m)[:, None]
    j = torch.arange(sel.n)[None, :]
    if sel.all_keys:
        return torch.ones(pairs, sel.m, sel.n, dtype=torch.bool) & ((j <= i)[None] if sel.causal else True)
    mask = torch.zeros(pairs, sel.m, sel.n + 1, dtype=torch.bool)  # column n takes the unused slots (-1)
    if sel.top_k > 0:
        own = torch.from_numpy(sel.query_keys)
        mask.scatter_(2, torch.where(own < 0, sel.n, own), True)
    mask = mask[..., :sel.n].clone()
    segment = sel.segment if sel.segment > 0 else sel.m
    blocks = (sel.m + segment - 1) // segment
    for s, keys in enumerate(sel.shared_keys):
        h, b = divmod(s, blocks)
        mask[h][b * segment:(b + 1) * segment, torch.from_numpy(keys)] = True
    if sel.window >= 0:
        mask |= ((i - j).abs() <= sel.window)[None]
    return mask & (j <= i)[None] if sel.causal else mask


def dense_masked(q, k, v, mask, kernel="softmax", p=2.0, scale=None):
    """The same attention as dense PyTorch operations (n x n), for autograd to differentiate."""
    shape = q.shape[:-2]
    q, k, v = (x.reshape(-1, *x.shape[-2:]) for x in (q, k, v))
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if kernel == "softmax" else 1.0
    s = scale * q @ k.transpose(1, 2)
    if kernel == "softmax":
        w = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
    else:
        f = s.abs().pow(p) * mask
        w = (f / f.sum(-1, keepdim=True)).nan_to_num(0.0)
    return (w @ v).reshape(*shape, q.shape[1], v.shape[-1])


def inputs(shape, n, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    *lead, m, d = shape
    q = torch.randn(*lead, m, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(*lead, n, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(*lead, n, dv, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("sel", SELECTIONS)
@pytest.mark.parametrize("kern", KERNELS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_gradcheck_float64(sel, kern):
    q, k, v = inputs((2, 2, 9, 4), 11, 3, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda a, b, c: lev_attention(a, b, c, select=with_kernel(sel, kern)), (q, k, v))


@pytest.mark.parametrize("sel", SELECTIONS)
@pytest.mark.parametrize("kern", KERNELS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_float32_forward_and_gradients_match_dense_masked_autograd(sel, kern):
    # Sizes that cross the kernels' query tiles (128) and key blocks (256).
    q, k, v = inputs((2, 2, 300, 16), 520, 8, torch.float32, seed=2)
    out, selection = lev_attention(q, k, v, select=with_kernel(sel, kern), return_selection=True)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_masked(q64, k64, v64, mask_of(selection), **kern)
    ref.backward(g.double())

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    assert out.dtype == torch.float32
    assert rel(out, ref) < 1e-4
    for ours, theirs in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel(ours, theirs) < 1e-4


@pytest.mark.parametrize("sel", CAUSAL)
def test_causal_gradcheck_float64(sel):
    q, k, v = inputs((2, 2, 11, 4), 11, 3, torch.float64, seed=1)
    assert torch.autograd.gradcheck(lambda a, b, c: lev_attention(a, b, c, select=sel, is_causal=True), (q, k, v))


@pytest.mark.parametrize("sel", CAUSAL)
def test_causal_float32_matches_dense_masked_autograd(sel):
    # 530 queries: three causal blocks (the leverage sets change at 256 and 512).
    q, k, v = inputs((1, 2, 530, 8), 530, 4, torch.float32, seed=2)
    out, selection = lev_attention(q, k, v, select=sel, is_causal=True, return_selection=True)
    selection = selection.to_selection()
    assert selection.causal and (selection.segment == 256) == sel.startswith("leverage")
    mask = mask_of(selection)
    assert not mask.triu(1).any()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = dense_masked(q64, k64, v64, mask)
    ref.backward(g.double())
    for ours, theirs in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert ((ours.double() - theirs).abs().max() / theirs.abs().max()).item() < 1e-4


def test_causal_full_is_masked_softmax_and_no_output_sees_later_tokens():
    q, k, v = inputs((2, 3, 40, 8), 40, 8, torch.float64, seed=7)
    s = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), -math.inf)
    torch.testing.assert_close(lev_attention(q, k, v, select="full", is_causal=True), torch.softmax(s, -1) @ v)
    layer = LevSelfAttention(32, 4, select="leverage+eps:0.1+window:4", is_causal=True, dtype=torch.float64)
    x = torch.randn(2, 300, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = layer(x)
    x2 = x.clone()
    x2[:, 200:] += 1.0  # change every token from 200 on
    y2 = layer(x2)
    torch.testing.assert_close(y[:, :200], y2[:, :200], rtol=0, atol=0)
    assert not torch.allclose(y[:, 200:], y2[:, 200:])
    with pytest.raises(ValueError, match="as many queries as keys"):
        lev_attention(q[..., :30, :], k, v, select="full", is_causal=True)
    with pytest.raises(ValueError, match="give eps"):
        lev_attention(q, k, v, select="leverage:4", is_causal=True)


def test_shapes_subsets_of_requires_grad_and_no_grad():
    for shape in ((30, 8), (3, 30, 8), (2, 3, 30, 8)):
        q, k, v = inputs(shape, 30, 5, torch.float32)
        out = lev_attention(q, k, v, select="leverage:6")
        assert out.shape == (*shape[:-1], 5)
    q, k, v = inputs((2, 40, 8), 40, 4, torch.float64)
    q.requires_grad_(False)
    k.requires_grad_(False)
    lev_attention(q, k, v, select="topk:5").sum().backward()
    assert q.grad is None and k.grad is None and v.grad is not None
    ref_v = v.detach().clone().requires_grad_()
    sel = lev_attention(q, k, v, select="topk:5", return_selection=True)[1]
    dense_masked(q, k, ref_v, mask_of(sel)).sum().backward()
    torch.testing.assert_close(v.grad, ref_v.grad)
    with torch.no_grad():
        out = lev_attention(q, k, v, select="leverage:4")
    assert not out.requires_grad


def test_selection_is_made_once_in_the_forward_and_saved():
    q, k, v = inputs((64, 8), 64, 4, torch.float64, seed=5)
    out, sel = lev_attention(q, k, v, select="random:9+seed:11", return_selection=True)
    again = lev_attention(q, k, v, select="random:9+seed:11", return_selection=True)[1]
    assert torch.equal(sel.key_segments, again.key_segments)
    sel = sel.to_selection()
    assert (sel.keys_per_query() == 9).all()
    other = lev_attention(q, k, v, select="random:9+seed:12", return_selection=True)[1].to_selection()
    assert sel.shared_keys[0].tolist() != other.shared_keys[0].tolist()


def test_full_selection_is_scaled_dot_product_attention():
    q, k, v = inputs((2, 4, 50, 16), 60, 16, torch.float64, seed=6)
    torch.testing.assert_close(lev_attention(q, k, v, select="full"),
                               torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v)


@pytest.mark.parametrize("call, text", [
    (lambda q, k, v: lev_attention(q.int(), k.int(), v.int(), select="leverage:2"), "float32, float64, bfloat16 or float16"),
    (lambda q, k, v: lev_attention(q, k.double(), v, select="leverage:2"), "one dtype"),
    (lambda q, k, v: lev_attention(q.to("meta"), k, v, select="leverage:2"), "CPU"),
    (lambda q, k, v: lev_attention(q[0, 0, 0], k, v, select="leverage:2"), "shape"),
    (lambda q, k, v: lev_attention(q, k[..., :3], v, select="leverage:2"), "expected shapes"),
    (lambda q, k, v: lev_attention(q.detach() * math.nan, k, v, select="leverage:2"), "finite"),
    (lambda q, k, v: lev_attention(q, k, v, select="leverage"), "top_k"),
    (lambda q, k, v: lev_attention(q, k, v, select="leverage:2+kernel:poly+p:-1"), "p"),
    (lambda q, k, v: lev_attention(q.tolist(), k, v, select="leverage:2"), "torch.Tensor"),
])
def test_bad_inputs_are_value_errors(call, text):
    q, k, v = inputs((1, 2, 10, 4), 10, 4, torch.float32)
    with pytest.raises(ValueError, match=text):
        call(q, k, v)


def test_nan_gradient_is_a_value_error():
    q, k, v = inputs((10, 4), 10, 4, torch.float32)
    out = lev_attention(q, k, v, select="leverage:3")
    with pytest.raises(ValueError, match="output gradient"):
        out.backward(torch.full_like(out, math.nan))


def test_self_attention_module_with_full_selection_is_multihead_attention():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    lev = LevSelfAttention(32, 4, select="full").double()
    lev.load_state_dict(mha.state_dict())
    x = torch.randn(3, 25, 32, dtype=torch.float64, requires_grad=True)
    ref = mha(x, x, x, need_weights=False)[0]
    x2 = x.detach().clone().requires_grad_()
    out = lev(x2)
    torch.testing.assert_close(out, ref)
    ref.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad)
    for (name, a), (_, b) in zip(lev.named_parameters(), mha.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert lev(x2[0]).shape == (25, 32)


def test_self_attention_module_trains_with_the_leverage_selection():
    torch.manual_seed(1)
    model = torch.nn.Sequential(LevSelfAttention(16, 2, select="leverage:8+window:1"), torch.nn.Linear(16, 1))
    x = torch.randn(16, 40, 16)
    y = x[:, :, :1].cumsum(1) / 10  # a target that needs mixing across tokens
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model[0].select = "topk:4"  # evaluated with another selection
    assert model(x).shape == (16, 40, 1)
    with pytest.raises(ValueError, match="multiple"):
        LevSelfAttention(10, 3)
