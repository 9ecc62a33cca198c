"""Property tests of the numpy API and the PyTorch op (hypothesis): random shapes (0, 1, n < d,
n >> d), dtypes, memory orders and strides, NaN/Inf anywhere, and random selection specs. Each
call returns what an independent oracle computes (numpy dense attention, SVD leverage scores, a
brute-force scan of the heavy entries) within its stated tolerance, or raises ValueError naming
the argument at fault; never a crash, another exception, or a wrong answer.
"""
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import levattn
from levattn.torch import lev_attention

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------
# Arrays as users pass them: any real dtype, C or Fortran order, or a strided view.

DTYPES = [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]
LAYOUTS = ["C", "F", "strided", "transposed"]


def laid_out(a, layout):
    """`a`'s values in another memory layout: same shape, same values."""
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if layout == "transposed":
        return np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
    return np.ascontiguousarray(a)


@st.composite
def matrices(draw, lead, rows, cols, dtype=None, scale=3.0):
    """A (lead..., rows, cols) array of values in [-scale, scale] in a drawn dtype and layout."""
    dtype = draw(st.sampled_from(DTYPES)) if dtype is None else dtype
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.uniform(-scale, scale, lead + (rows, cols))
    if np.issubdtype(dtype, np.integer):
        a = np.round(a)
    a = (a > 0) if dtype == np.bool_ else a.astype(dtype)
    return laid_out(a, draw(st.sampled_from(LAYOUTS)))


def as64(a):
    return np.asarray(a, dtype=np.float32).astype(np.float64)  # the library computes from float32


def dense(q, k, v, scale=None, causal=False):
    q, k, v = as64(q), as64(k), as64(v)
    s = np.einsum("...md,...nd->...mn", q, k) * (1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    return (w / w.sum(axis=-1, keepdims=True)) @ v


# The library's own name of each array argument, as its messages give it.
LIBRARY_NAMES = {"q": "queries", "k": "keys", "v": "values", "Q": "queries", "K": "keys"}


def raises_naming(names, f, *args, **kwargs):
    """f(...) must raise ValueError whose message starts with one of `names` (or its library name)."""
    with pytest.raises(ValueError) as e:
        f(*args, **kwargs)
    message = str(e.value)
    names = names + [LIBRARY_NAMES[n] for n in names if n in LIBRARY_NAMES]
    assert any(re.match(rf"^(selection ')?{re.escape(n)}\b", message) for n in names), message


# ---------------------------------------------------------------------------------------------
# attention: select full is dense attention, whatever the dtype and layout.

lead_dims = st.sampled_from([(), (1,), (2,), (1, 2), (2, 1)])


@SETTINGS
@given(data=st.data(), lead=lead_dims, m=st.integers(1, 9), n=st.integers(1, 40), d=st.integers(1, 8),
       dv=st.integers(1, 5), causal=st.booleans(), scale=st.one_of(st.none(), st.floats(-2, 2)))
def test_full_attention_is_dense_attention(data, lead, m, n, d, dv, causal, scale):
    if causal:
        m = n
    q, k, v = (data.draw(matrices(lead, r, c)) for r, c in ((m, d), (n, d), (n, dv)))
    out = levattn.attention(q, k, v, "full", scale=scale, causal=causal)
    assert out.dtype == np.float32 and out.shape == lead + (m, dv)
    np.testing.assert_allclose(out, dense(q, k, v, scale, causal), rtol=2e-4, atol=2e-4)


@SETTINGS
@given(data=st.data(), n=st.integers(1, 30), d=st.integers(1, 6), which=st.sampled_from(["q", "k", "v"]),
       bad=st.sampled_from([np.nan, np.inf, -np.inf]), select=st.sampled_from(["full", "leverage:3", "topk:2",
                                                                                  "window:1", "cluster:2"]))
def test_nan_or_inf_anywhere_is_a_value_error_naming_the_array(data, n, d, which, bad, select):
    arrays = {name: data.draw(matrices((), n, d, np.float32)) for name in "qkv"}
    a = np.array(arrays[which])
    a[data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, d - 1))] = bad
    arrays[which] = a
    raises_naming([which], levattn.attention, arrays["q"], arrays["k"], arrays["v"], select)


@SETTINGS
@given(data=st.data(), shapes=st.sampled_from([
    ((0, 3), (4, 3), (4, 2), ["q"]),            # no queries
    ((2, 3), (0, 3), (0, 2), ["k", "v"]),       # no keys
    ((2, 0), (4, 0), (4, 2), ["q", "k"]),       # d = 0
    ((2, 3), (4, 2), (4, 2), ["q", "k"]),       # d differs
    ((2, 3), (4, 3), (5, 2), ["v", "k"]),       # one value row per key
    ((2, 3), (4, 3), (4, 0), ["v"]),            # dv = 0
    ((3,), (4, 3), (4, 2), ["q"]),              # 1-D
    ((1, 1, 1, 2, 3), (1, 1, 1, 4, 3), (1, 1, 1, 4, 2), ["q"]),  # 5-D
    ((2, 2, 3), (3, 4, 3), (3, 4, 2), ["q", "k"]),  # heads differ
]), select=st.sampled_from(["full", "leverage:2", "topk:1", "random:2", "window:1"]))
def test_bad_shapes_are_value_errors_naming_the_array(data, shapes, select):
    qs, ks, vs, names = shapes
    q, k, v = (np.ones(s, np.float32) for s in (qs, ks, vs))
    raises_naming(names + ["q, k, v"], levattn.attention, q, k, v, select)


def test_other_dtypes_are_value_errors_naming_the_array():
    good = np.ones((2, 3), np.float32)
    for bad in (np.ones((2, 3), np.complex64), np.array([["a", "b", "c"]] * 2), np.array([[None] * 3] * 2)):
        raises_naming(["q"], levattn.attention, bad, good, good)
    raises_naming(["k"], levattn.attention, good, None, good)


# ---------------------------------------------------------------------------------------------
# Random selection specs: a spec either runs or is a ValueError naming the spec; a selection that
# keeps every key is dense attention; any softmax selection's rows are convex combinations of V.

SPEC_FIELDS = {
    "window": st.integers(-2, 12), "sinks": st.integers(-1, 5), "probe": st.integers(-1, 6),
    "clusters": st.integers(-1, 8), "iterations": st.integers(0, 4), "seed": st.integers(0, 9),
    "residual": st.integers(-1, 6), "eps": st.sampled_from([-0.1, 0.0, 0.05, 0.3, 1.0, 1.5]),
    "kernel": st.sampled_from(["softmax", "poly", "cubic"]), "p": st.sampled_from([1.0, 2.0, 4.0, 0.0]),
    "method": st.sampled_from(["exact", "sketch"]), "ridge": st.sampled_from([0.0, 0.1, -1.0]),
    "precision": st.sampled_from(["float32", "bf16"]), "budget_alpha": st.sampled_from([0.5, 2.0, 0.0]),
    "budget_exponent": st.sampled_from([0.5, 1.0, 2.0]), "sketch_size": st.integers(0, 64),
}


@st.composite
def specs(draw):
    name = draw(st.sampled_from(["full", "leverage", "topk", "random", "window", "cluster"]))
    spec = name
    if name != "full" and draw(st.booleans()):
        spec += f":{draw(st.integers(-1, 50))}"
    for field in draw(st.lists(st.sampled_from(sorted(SPEC_FIELDS)), max_size=3, unique=True)):
        value = draw(SPEC_FIELDS[field])
        spec += f"+{field}:{value:g}" if isinstance(value, float) else f"+{field}:{value}"
    return spec


SPEC_NAMES = ["selection", "select", "top_k", "eps", "window", "sinks", "residual", "cluster", "clusters, probe, iterations",
              "kernel", "p", "budget", "ridge", "causal leverage", "sketch_size", "method", "precision"]


@settings(SETTINGS, max_examples=400)
@given(data=st.data(), spec=specs(), lead=lead_dims, n=st.integers(1, 40), d=st.integers(1, 6), causal=st.booleans())
def test_random_specs_run_or_are_value_errors(data, spec, lead, n, d, causal):
    m = n if causal else data.draw(st.integers(1, 12))
    q, k = data.draw(matrices(lead, m, d, np.float32)), data.draw(matrices(lead, n, d, np.float32))
    v = data.draw(matrices(lead, n, 3, np.float32))
    try:
        out, r = levattn.attention(q, k, v, spec, causal=causal, return_result=True)
    except ValueError as e:
        assert any(str(e).startswith(s) or str(e).startswith(f"selection '{spec}': ") for s in SPEC_NAMES), str(e)
        event("refused")
        return
    assert out.shape == lead + (m, 3) and np.isfinite(out).all()
    parsed = levattn.parse_selection(spec)
    softmax = "kernel:poly" not in parsed and "residual" not in parsed
    if softmax:  # nonnegative weights summing to 1 (or a row of 0 where no key was selected)
        lo, hi = v.min(axis=-2, keepdims=True), v.max(axis=-2, keepdims=True)
        empty = np.all(out == 0, axis=-1, keepdims=True)
        assert np.all(empty | ((out >= lo - 1e-4) & (out <= hi + 1e-4)))
    keeps_all = r.mean_keys_per_query == (n if not causal else (n + 1) / 2) and r.empty_rows == 0
    event(f"ran, {'every key' if keeps_all else 'a selection'}")
    if softmax and keeps_all and "precision:bf16" not in parsed:
        np.testing.assert_allclose(out, dense(q, k, v, causal=causal), rtol=2e-4, atol=2e-4)


@SETTINGS
@given(spec=st.text(max_size=20))
def test_any_text_parses_or_is_a_value_error_naming_the_spec(spec):
    try:
        printed = levattn.parse_selection(spec)
    except ValueError as e:  # the spec quoted, control characters escaped (a NUL would cut the message)
        shown = "".join(c if " " <= c != "\x7f" else f"\\x{ord(c):02x}" for c in spec)
        assert str(e).startswith(f"selection '{shown}': ") and len(str(e)) > len(shown) + 16, str(e)
        return
    assert levattn.parse_selection(printed) == printed


# ---------------------------------------------------------------------------------------------
# Leverage scores against the SVD; heavy entries against a scan of every pair.

@st.composite
def keys_of_known_rank(draw, n, d):
    """K = A B with A (n, r), B (r, d) of drawn rank r <= min(n, d), at a drawn magnitude."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    r = draw(st.integers(1, min(n, d)))
    scale = 10.0 ** draw(st.integers(-3, 3))
    K = (rng.standard_normal((n, r)) @ rng.standard_normal((r, d))) * scale
    return laid_out(K.astype(draw(st.sampled_from([np.float32, np.float64]))), draw(st.sampled_from(LAYOUTS)))


@SETTINGS
@given(data=st.data(), n=st.integers(1, 80), d=st.integers(1, 8))
def test_leverage_scores_are_the_svd_scores(data, n, d):
    K = data.draw(keys_of_known_rank(n, d))
    s = levattn.leverage_scores(K)
    u, sv, _ = np.linalg.svd(as64(K), full_matrices=False)
    assume(sv[0] > 0)
    r = int(np.sum(sv > sv[0] * 1e-5))
    assume(r == len(sv) or sv[r] < sv[0] * 1e-7)  # a rank the float32 keys show clearly
    assert s.rank == r
    np.testing.assert_allclose(s.scores, np.sum(u[:, :r] ** 2, axis=1), atol=2e-4)
    assert abs(s.scores.sum() - r) < 1e-3 * max(1, r)


@SETTINGS
@given(data=st.data(), m=st.integers(1, 12), n=st.integers(1, 40), d=st.integers(1, 6),
       eps=st.floats(0.01, 1.0))
def test_heavy_entries_are_the_brute_force_entries(data, m, n, d, eps):
    Q, K = data.draw(matrices((), m, d, np.float32)), data.draw(matrices((), n, d, np.float32))
    logits = as64(Q) @ as64(K).T
    weights = logits ** 2
    norm = weights.sum(axis=1, keepdims=True)
    A = np.divide(weights, norm, out=np.zeros_like(weights), where=norm > 0)
    assume(np.all(np.abs(A - eps) > 1e-5))  # no entry at the threshold to rounding
    h = levattn.heavy_entries(Q, K, eps)
    found = set(zip(h.queries.tolist(), h.keys.tolist()))
    assert found == set(zip(*np.nonzero((A >= eps) & (norm > 0))))
    np.testing.assert_allclose(h.values, A[h.queries, h.keys], rtol=1e-4)


def test_eps_outside_its_range_is_a_value_error_naming_it():
    K = np.eye(4, 3, dtype=np.float32)
    for eps in (0.0, -0.5, 1.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"\beps\b"):  # eps = 0: neither eps nor top_k given
            levattn.universal_set(K, eps)
        raises_naming(["eps"], levattn.heavy_entries, K, K, eps)


# ---------------------------------------------------------------------------------------------
# The PyTorch op: gradcheck on small random cases of every selection, causal or not, grouped
# query heads or not.

@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(1, 7), n=st.integers(1, 9), d=st.integers(1, 4),
       dv=st.integers(1, 3), causal=st.booleans(), gqa=st.booleans(),
       select=st.sampled_from(["full", "leverage:3", "leverage:2+window:1+sinks:1", "topk:2", "random:3+seed:1",
                               "window:1+sinks:1", "cluster:2+probe:1", "leverage:3+kernel:poly+p:4"]))
def test_op_gradients_pass_gradcheck(seed, m, n, d, dv, causal, gqa, select):
    if causal:
        m = n
    g = torch.Generator().manual_seed(seed)
    heads, kv_heads = (2, 1) if gqa else (2, 2)
    q = torch.randn(heads, m, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(kv_heads, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(kv_heads, n, dv, generator=g, dtype=torch.float64, requires_grad=True)

    def f(a, b, c):
        return lev_attention(a, b, c, select=select, is_causal=causal, enable_gqa=gqa)

    try:
        f(q, k, v)
    except ValueError as e:  # causal leverage takes eps, not a budget
        assert causal and select.startswith("leverage") and "causal leverage" in str(e), str(e)
        return
    assert torch.autograd.gradcheck(f, (q, k, v))
