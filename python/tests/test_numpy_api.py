"""The numpy API against numpy oracles: scores, sets, heavy entries, attention, errors, files."""
import re
import subprocess
import sys
import threading

import numpy as np
import pytest

import levattn


def rng(seed=0):
    return np.random.default_rng(seed)


def svd_leverage(K):
    u, s, _ = np.linalg.svd(K.astype(np.float64), full_matrices=False)
    r = int(np.sum(s > s[0] * 1e-5))
    return np.sum(u[:, :r] ** 2, axis=1), r


def dense_softmax(q, k, v, scale=None):
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    s = q @ k.T * (1.0 / np.sqrt(q.shape[-1]) if scale is None else scale)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    return (w / w.sum(axis=1, keepdims=True)) @ v


def test_leverage_scores_match_the_svd():
    K = rng().standard_normal((300, 12)).astype(np.float32)
    K[:, 11] = K[:, 0] + K[:, 1]  # rank 11
    s = levattn.leverage_scores(K)
    tau, r = svd_leverage(K)
    assert s.rank == r == 11
    assert s.scores.dtype == np.float64 and s.scores.shape == (300,)
    np.testing.assert_allclose(s.scores, tau, atol=1e-5)


def test_sketched_scores_are_reproducible_by_seed_and_close():
    K = rng(1).standard_normal((4000, 8)).astype(np.float32)
    a = levattn.leverage_scores(K, levattn.LeverageOptions(method="sketch", sketch_size=400, seed=3))
    b = levattn.leverage_scores(K, leverage=levattn.LeverageOptions(method="sketch", sketch_size=400, seed=3))
    np.testing.assert_array_equal(a.scores, b.scores)
    tau, _ = svd_leverage(K)
    assert np.max(np.abs(a.scores / tau - 1)) < 0.6
    assert a.method == "sketch" and a.sketch_size == 400
    with pytest.raises(TypeError, match=r"one LeverageOptions.*method=\.\.\., sketch_size=\.\.\."):
        levattn.leverage_scores(K, method="sketch", sketch_size=400)


def test_universal_set_is_the_scores_above_eps_and_batches_like_single_heads():
    K = rng(2).standard_normal((2, 3, 80, 6)).astype(np.float32)
    K[0, 1, 5] *= 30  # a key that stands out
    sets = levattn.universal_set(K, 0.2)
    assert len(sets) == 6
    for pair, u in enumerate(sets):
        Kh = K.reshape(6, 80, 6)[pair]
        tau, _ = svd_leverage(Kh)
        np.testing.assert_array_equal(u.indices, np.flatnonzero(tau >= 0.2))
        single = levattn.universal_set(Kh, 0.2)
        np.testing.assert_array_equal(single.indices, u.indices)
        assert len(u) <= u.size_bound
    assert 5 in sets[1].indices
    top = levattn.universal_set(K[0, 0], top_k=7)
    tau, _ = svd_leverage(K[0, 0])
    np.testing.assert_array_equal(np.sort(top.indices), np.sort(np.argsort(-tau, kind="stable")[:7]))


def test_heavy_entries_match_brute_force():
    r = rng(3)
    K = r.standard_normal((400, 8)).astype(np.float32)
    Q = r.standard_normal((50, 8)).astype(np.float32)
    h = levattn.heavy_entries(Q, K, 0.05)
    A = (Q.astype(np.float64) @ K.T.astype(np.float64)) ** 2
    A /= A.sum(axis=1, keepdims=True)
    qi, kj = np.nonzero(A >= 0.05)
    np.testing.assert_array_equal(h.queries, qi)
    np.testing.assert_array_equal(h.keys, kj)
    np.testing.assert_allclose(h.values, A[qi, kj], rtol=1e-5)
    truth = levattn.heavy_entries_brute_force(Q, K, 0.05)
    agree = levattn.compare_heavy_entries(h, truth)
    assert agree.recall == 1.0 and agree.precision == 1.0


def test_heavy_entries_by_countsketch_search():
    r = rng(3)
    K = r.standard_normal((400, 8)).astype(np.float32)
    K[::40] *= 6.0  # strong keys: heavy entries for many queries
    Q = r.standard_normal((60, 8)).astype(np.float32)
    exact = levattn.heavy_entries(Q, K, 0.05)
    assert len(exact) > 20
    h = levattn.heavy_entries(Q, K, 0.05, search="countsketch", delta=0.05, seed=2)
    assert h.sketch_buckets == 1280 and h.sketch_rows == int(np.ceil(np.log2(60 / (0.05 * 0.05))))
    assert len(h) <= h.candidates
    agree = levattn.compare_heavy_entries(h, levattn.heavy_entries_brute_force(Q, K, 0.05))
    assert agree.precision == 1.0 and agree.recall == 1.0 and agree.max_rel_value_error < 1e-6
    with pytest.raises(ValueError, match="search countsketch"):
        levattn.heavy_entries(Q, K, 0.05, p=3.0, search="countsketch")
    with pytest.raises(ValueError, match="search"):
        levattn.heavy_entries(Q, K, 0.05, search="bloom")


def test_full_attention_is_dense_softmax_for_every_layout():
    r = rng(4)
    q = r.standard_normal((2, 3, 70, 16)).astype(np.float32)
    k = r.standard_normal((2, 3, 90, 16)).astype(np.float32)
    v = r.standard_normal((2, 3, 90, 5)).astype(np.float32)
    out = levattn.attention(q, k, v)
    assert out.shape == (2, 3, 70, 5) and out.dtype == np.float32
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(out[b, h], dense_softmax(q[b, h], k[b, h], v[b, h]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(levattn.attention(q[0], k[0], v[0]), out[0], rtol=1e-6)
    np.testing.assert_allclose(levattn.attention(q[0, 0], k[0, 0], v[0, 0]), out[0, 0], rtol=1e-6)


def test_leverage_attention_attends_its_selection():
    r = rng(5)
    q, k, v = (r.standard_normal((120, 8)).astype(np.float32) for _ in range(3))
    out, res = levattn.attention(q, k, v, "leverage:10+sinks:2", return_result=True)
    keys = res.selection.shared_keys[0]
    assert len(keys) <= 12 and {0, 1} <= set(keys.tolist())
    np.testing.assert_allclose(out, dense_softmax(q, k[keys], v[keys]), rtol=1e-4, atol=1e-5)
    sel = levattn.select_keys(q, k, "leverage:10+sinks:2")
    np.testing.assert_array_equal(sel.shared_keys[0], keys)
    assert res.selection.window == sel.window == -1 and res.selection.top_k == 0
    assert (sel.keys_per_query() == len(keys)).all()


def test_selection_metrics_of_a_planted_instance():
    inst = levattn.planted(1024, 16, relevant=4, seed=2)
    assert inst.Q.shape == (1024, 16) and sorted(inst.relevant.tolist()) == inst.relevant.tolist()
    out, res = levattn.attention(inst.Q, inst.K, inst.V, "leverage+eps:0.05+kernel:poly", return_result=True)
    m = levattn.selection_metrics(inst.Q, inst.K, inst.V, out, res.selection, kernel="poly", heavy_eps=0.05)
    assert m["kernel_heavy_recall"] == 1.0 and m["kernel_heavy"] > 0 and 0.0 < m["kernel_mass"] <= 1.0
    assert m["keys_per_query"] == len(res.selection.shared_keys[0]) and m["output_error"] < 1.0
    assert set(inst.relevant.tolist()) <= set(res.selection.shared_keys[0].tolist())
    # The same evaluator as evaluate(): the same figures for the same selection.
    row = levattn.evaluate(inst.Q, inst.K, inst.V, ["leverage+eps:0.05+kernel:poly"], heavy_eps=0.05)[0]
    for key in ("kernel_mass", "kernel_heavy_recall", "softmax_mass", "x2_heavy_recall", "output_error"):
        assert m[key] == pytest.approx(row[key], rel=1e-6, abs=1e-7), key
    with pytest.raises(ValueError, match="selection"):
        levattn.selection_metrics(inst.Q[:10], inst.K, inst.V, out[:10], res.selection)


def test_lewis_weights_sensitivities_and_reduction():
    K = rng(6).standard_normal((500, 6)).astype(np.float32)
    w = levattn.lewis_weights(K, 3.0)
    assert w.converged and abs(w.weights.sum() - w.rank) < 1e-6
    s2 = levattn.sensitivity_bounds(K, 2.0)
    np.testing.assert_allclose(s2.scores, levattn.leverage_scores(K).scores)
    X = rng(7).standard_normal((200, 64)).astype(np.float32) / 8
    red = levattn.reduce_dimension(X, 32, method="svd")
    assert red.Y.shape == (200, 32) and red.method == "svd"
    assert levattn.softmax_gram_error(X, red.Y) < 0.5
    g = levattn.key_gram(K)
    np.testing.assert_allclose(g.gram, K.T.astype(np.float64) @ K.astype(np.float64), rtol=1e-6)
    assert levattn.sketch_rows(K, 50).shape == (50, 6)
    assert levattn.adaptive_budget(10000, 2.0, 0.5) == 200


def test_inputs_are_converted_when_they_must_be():
    r = rng(8)
    K = r.standard_normal((60, 10))  # float64, then a non-contiguous view, then nested lists
    a = levattn.leverage_scores(K).scores
    np.testing.assert_allclose(levattn.leverage_scores(np.asfortranarray(K)).scores, a)
    np.testing.assert_allclose(levattn.leverage_scores(K.tolist()).scores, a)
    np.testing.assert_allclose(levattn.leverage_scores(np.hstack([K, K])[:, :10]).scores, a)


@pytest.mark.parametrize("call, text", [
    (lambda: levattn.leverage_scores(np.full((4, 2), np.nan)), "finite"),
    (lambda: levattn.leverage_scores(np.array([[1 + 1j, 2]])), "real numbers"),
    (lambda: levattn.leverage_scores(np.array([["a", "b"]])), "real numbers"),
    (lambda: levattn.leverage_scores(np.zeros((0, 4))), "non-empty"),
    (lambda: levattn.leverage_scores(np.zeros(4)), "2-D"),
    (lambda: levattn.leverage_scores(None), "None"),
    (lambda: levattn.universal_set(np.ones((5, 2)), 1.5), "eps"),
    (lambda: levattn.universal_set(np.ones((2, 2, 2, 5, 2)), 0.5), "4-D"),
    (lambda: levattn.attention(np.ones((3, 4)), np.ones((3, 5)), np.ones((3, 2))), "columns"),
    (lambda: levattn.attention(np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 2)), select="nope"), "select"),
    (lambda: levattn.attention(np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 2)), "leverage"), "top_k"),
    (lambda: levattn.attention(np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 2)), scale=float("inf")), "scale"),
    (lambda: levattn.attention(np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 2)), "random:2+seed:-1"),
     "seed"),
    (lambda: levattn.attention(np.ones((3, 4)), np.ones((3, 4)), np.ones((3, 2)), "window:-2"), "window"),
    (lambda: levattn.heavy_entries(np.ones((3, 4)), np.ones((3, 4)), 0.1, normaliser="other"), "normaliser"),
    (lambda: levattn.reduce_dimension(np.ones((3, 4)), 2, method="pca"), "method"),
])
def test_bad_arguments_are_value_errors_naming_what_was_expected(call, text):
    with pytest.raises(ValueError, match=text):
        call()


def test_npy_files_are_numpys_and_bad_state_files_are_os_errors(tmp_path):
    with pytest.raises(AttributeError, match="numpy.load"):
        levattn.read_npy  # noqa: B018
    with pytest.raises(AttributeError, match="numpy.savez"):
        levattn.write_npz  # noqa: B018
    (tmp_path / "bad.npz").write_bytes(b"PK\x05\x06garbage")
    with pytest.raises(OSError, match="bad.npz"):
        levattn.StreamingUniversalSet.load(tmp_path / "bad.npz")
    with pytest.raises(OSError, match="missing.npz"):
        levattn.StreamingUniversalSet.load(tmp_path / "missing.npz")


def test_concurrent_calls_from_python_threads_agree():
    # The GIL is released inside the library: calls from several threads run at once and must
    # give what each gives alone (no shared state).
    r = rng(10)
    inputs = [tuple(r.standard_normal((2, 300, 16)).astype(np.float32) for _ in range(3)) for _ in range(4)]
    alone = [levattn.attention(*x, "leverage:32+window:4") for x in inputs]
    results = [None] * 4

    def work(i):
        for _ in range(5):
            results[i] = levattn.attention(*inputs[i], "leverage:32+window:4")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, results):
        np.testing.assert_array_equal(a, b)


def test_module_info_prints_the_build_and_versions():
    text = subprocess.run([sys.executable, "-m", "levattn", "info"], check=True, capture_output=True,
                          text=True).stdout
    for field in ("levattn ", "BLAS:", "ISA:", "threads:", "numpy:", "torch:"):
        assert field in text
    assert levattn.__version__ == levattn.build_info()["version"]
    bad = subprocess.run([sys.executable, "-m", "levattn", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_cluster_selection_with_every_cluster_searched_is_the_exact_topk():
    r = rng(11)
    q = r.standard_normal((100, 8)).astype(np.float32)
    k = r.standard_normal((400, 8)).astype(np.float32)
    exact = levattn.select_keys(q, k, "topk:10")
    every = levattn.select_keys(q, k, "cluster:10+clusters:20+probe:20")
    np.testing.assert_array_equal(every.query_keys, exact.query_keys)
    out, res = levattn.attention(q, k, k, "cluster:10+window:2", return_result=True)
    assert res.selection.query_keys.shape == (1, 100, 10) and out.shape == (100, 8)
    with pytest.raises(ValueError, match="probe"):
        levattn.attention(q, k, k, "cluster:10+probe:-1")


def test_evaluate_scale_is_the_softmax_scale_of_pre_scaled_heads():
    # A model's heads often carry their scale in the queries: evaluated at scale 1 they give what
    # the unscaled queries give at the default 1/sqrt(d); the x^2 recall is free of the scale.
    r = rng(13)
    q = r.standard_normal((2, 60, 16)).astype(np.float32)
    k = r.standard_normal((2, 80, 16)).astype(np.float32)
    v = r.standard_normal((2, 80, 4)).astype(np.float32)
    specs = ["topk:6", "leverage:10+window:2", "window:3"]
    plain = levattn.evaluate(q, k, v, specs)
    scaled = levattn.evaluate(q / np.float32(4.0), k, v, specs, scale=1.0)
    assert [x["selection"] for x in scaled[:3]] == specs and [x["scale"] for x in scaled[:3]] == [1.0] * 3
    assert [x["scale"] for x in plain[:3]] == [0.25] * 3
    for a, b in zip(plain, scaled):
        for field in ("softmax_mass", "output_error", "x2_heavy_recall", "keys_per_query"):
            assert b[field] == pytest.approx(a[field], rel=1e-4, abs=1e-6), field
    wrong = levattn.evaluate(q / np.float32(4.0), k, v, specs)  # the default scale applied twice
    assert wrong[0]["softmax_mass"] < plain[0]["softmax_mass"] - 0.01
    with pytest.raises(ValueError, match="scale"):
        levattn.evaluate(q, k, v, specs, scale=0.0)


def test_evaluate_matches_a_numpy_oracle():
    r = rng(12)
    q = r.standard_normal((3, 70, 6)).astype(np.float32)
    k = r.standard_normal((3, 100, 6)).astype(np.float32)
    v = r.standard_normal((3, 100, 5)).astype(np.float32)
    rows = levattn.evaluate(q, k, v, ["topk:9", "random:12+sinks:2", "full"], heavy_eps=0.04, p=3.0)
    assert [(x["pair"], x["selection"]) for x in rows][:3] == [(0, "topk:9"), (0, "random:12+sinks:2"),
                                                              (0, "full")]
    sels = [levattn.select_keys(q, k, "topk:9"), levattn.select_keys(q, k, "random:12+sinks:2"),
            None]
    for x in rows:
        h, c = x["pair"], ["topk:9", "random:12+sinks:2", "full"].index(x["selection"])
        s = q[h].astype(np.float64) @ k[h].T.astype(np.float64)
        mask = np.ones(s.shape, bool) if sels[c] is None else np.zeros(s.shape, bool)
        if c == 0:
            np.put_along_axis(mask, sels[0].query_keys[h], True, axis=1)
        elif c == 1:
            mask[:, sels[1].shared_keys[h]] = True
        soft = np.exp(s / np.sqrt(6) - (s / np.sqrt(6)).max(1, keepdims=True))
        soft /= soft.sum(1, keepdims=True)
        x2 = s ** 2 / (s ** 2).sum(1, keepdims=True)
        pw = np.abs(s) ** 3 / (np.abs(s) ** 3).sum(1, keepdims=True)
        masked = np.where(mask, soft, 0)
        approx = (masked / masked.sum(1, keepdims=True)) @ v[h]
        full = soft @ v[h]
        np.testing.assert_allclose(x["softmax_mass"], (soft * mask).sum(1).mean(), rtol=1e-5)
        np.testing.assert_allclose(x["output_error"], np.linalg.norm(approx - full) / np.linalg.norm(full),
                                   rtol=1e-3, atol=1e-6)
        assert x["x2_heavy"] == (x2 >= 0.04).sum() and x["power_heavy"] == (pw >= 0.04).sum()
        np.testing.assert_allclose(x["x2_heavy_recall"], (mask & (x2 >= 0.04)).sum() / max((x2 >= 0.04).sum(), 1))
        np.testing.assert_allclose(x["power_heavy_recall"], (mask & (pw >= 0.04)).sum() / max((pw >= 0.04).sum(), 1))
        assert x["keys_per_query"] == mask.sum(1).mean()
        assert x["scores_tied"] is False
    tied = levattn.evaluate(q[0, :5], k[0, :5], v[0, :5], ["leverage:2"])[0]
    assert tied["scores_tied"] is True  # 5 keys in dimension 6: every leverage score is 1
    with pytest.raises(ValueError, match="wndow"):
        levattn.evaluate(q, k, v, ["topk:3+wndow:2"])
    assert levattn.parse_selection("leverage+window:4+eps:0.05") == "leverage+eps:0.05+window:4"
    assert levattn.parse_selection("leverage+top_k:32+window:4") == "leverage:32+window:4"


def test_evaluate_a_residual_part_against_a_numpy_oracle_with_its_weights():
    r = rng(14)
    q = r.standard_normal((2, 70, 6)).astype(np.float32)
    k = r.standard_normal((2, 300, 6)).astype(np.float32)
    v = r.standard_normal((2, 300, 5)).astype(np.float32) + 1.0
    spec = "leverage:9+window:2+residual:40+seed:4"
    rows = levattn.evaluate(q, k, v, [spec, "leverage:9+window:2+residual:400"])
    sel = levattn.select_keys(q, k, spec)
    assert sel.residual == 40 and sel.residual_keys.shape == (2, 1, 40) and sel.residual_weight.shape == (2, 1)
    I, J = np.arange(70)[:, None], np.arange(300)[None, :]
    for x in rows[::2]:
        h = x["pair"]
        W = np.zeros((70, 300))
        W[:, sel.residual_keys[h, 0]] = sel.residual_weight[h, 0]
        W[:, sel.shared_keys[h]] = 1.0
        W[np.abs(I - J) <= 2] = 1.0
        assert np.isclose(sel.residual_weight[h, 0], (300 - len(sel.shared_keys[h])) / 40)
        s = q[h].astype(np.float64) @ k[h].T.astype(np.float64) / np.sqrt(6)
        e = np.exp(s - s.max(1, keepdims=True))
        approx, full = (e * W) @ v[h] / (e * W).sum(1, keepdims=True), e @ v[h] / e.sum(1, keepdims=True)
        np.testing.assert_allclose(x["output_error"], np.linalg.norm(approx - full) / np.linalg.norm(full),
                                   rtol=1e-3, atol=1e-6)
        assert x["keys_per_query"] == (W > 0).sum(1).mean()
    # Drawing the whole rest (300 keys less the shared ones) is exact attention.
    assert all(x["output_error"] < 1e-5 and x["keys_per_query"] == 300 for x in rows[1::2])


def test_attention_backward_checks_the_shapes_of_q_k_v():
    r = rng(13)
    q, k, v = (r.standard_normal((2, 20, 4)).astype(np.float32) for _ in range(3))
    sel = levattn.select_keys(q, k, "topk:3")
    out, stat = levattn.attention_forward(q, k, v, sel)
    for kk in (k[:, :, :3], k[:1]):  # another d, fewer heads: refused before any read
        with pytest.raises(ValueError, match="same leading dimensions"):
            levattn.attention_backward(q, np.ascontiguousarray(kk), v, out, stat, out, sel)
    with pytest.raises(ValueError, match="do not match"):
        levattn.attention_backward(q, k, v, out[:, :10], stat, out, sel)


def spiky_keys(n, d, seed):
    rng = np.random.default_rng(seed)
    K = (rng.standard_normal((n, d)) * 0.05).astype(np.float32)
    K[rng.integers(0, n, 3 * d), np.arange(3 * d) % d] += 4.0
    return K


def test_streaming_universal_set_is_the_offline_set_for_any_blocks(tmp_path):
    K = spiky_keys(5000, 8, 1)
    V = np.random.default_rng(2).standard_normal((5000, 3)).astype(np.float32)
    want = levattn.universal_set(K, eps=0.05)
    tau, _ = svd_leverage(K)
    assert list(want.indices) == [j for j in range(5000) if tau[j] >= 0.05]
    for block in (1, 333, 5000):
        s = levattn.StreamingUniversalSet(8, 0.05, dv=3)
        for i in range(0, 5000, block):
            s.push(K[i:i + block], V[i:i + block])
        got = s.universal_set()
        assert s.n == 5000 and s.candidates < 5000
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.scores, want.scores)
    # Exact heavy entries against brute force, attention over the kept keys, a restored state.
    Q = np.random.default_rng(3).standard_normal((40, 8)).astype(np.float32)
    h, truth = s.heavy_entries(Q), levattn.heavy_entries_brute_force(Q, K, 0.05)
    np.testing.assert_array_equal(h.keys, truth.keys)
    np.testing.assert_allclose(h.values, truth.values, rtol=1e-6)
    ku = K[want.indices]
    logits = Q @ ku.T / np.sqrt(8.0)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(s.attention(Q), (w / w.sum(axis=1, keepdims=True)) @ V[want.indices], rtol=1e-4, atol=1e-5)
    s.save(tmp_path / "state.npz")
    r = levattn.StreamingUniversalSet.load(tmp_path / "state.npz")
    np.testing.assert_array_equal(r.universal_set().scores, s.universal_set().scores)
    with np.load(tmp_path / "state.npz") as z:  # named members, read by numpy
        assert len(z["index"]) == s.candidates and np.all(np.diff(z["index"]) > 0)
        assert z["version"].tolist() == [3] and z["keys"].shape == (s.candidates, 8)
    data = (tmp_path / "state.npz").read_bytes()
    (tmp_path / "bad.npz").write_bytes(data[:-3])
    with pytest.raises(OSError, match="bad.npz"):
        levattn.StreamingUniversalSet.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="keys"):
        s.push(np.zeros((3, 5), np.float32), np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="eps"):
        levattn.StreamingUniversalSet(8, 0.0)


def test_causal_attention_heavy_entries_and_sets():
    g = rng(21)
    n, d = 600, 6
    q = g.standard_normal((n, d)).astype(np.float32)
    k = (g.standard_normal((n, d)) * np.exp(g.standard_normal((n, 1)))).astype(np.float32)
    v = g.standard_normal((n, 3)).astype(np.float32)
    tril = np.tri(n, dtype=bool)
    s = np.where(tril, (q.astype(np.float64) @ k.T.astype(np.float64)) / np.sqrt(d), -np.inf)
    w = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_allclose(levattn.attention(q, k, v, causal=True), (w / w.sum(1, keepdims=True)) @ v,
                               rtol=2e-5, atol=2e-6)
    eps = 0.1
    sel = levattn.select_keys(q, k, f"leverage+eps:{eps}", causal=True)
    assert sel.causal and sel.segment == 256 and len(sel.shared_keys) == 3
    sets = levattn.causal_universal_sets(k, eps)
    assert sets.causal and sets.segment == 256 and sets.m == sets.n == n
    assert [x.tolist() for x in sets.shared_keys] == [x.tolist() for x in sel.shared_keys]
    # Before each block of 256 queries, at most about d / eps keys are kept (the block's own follow).
    assert max(len(x) - min(256, n - 256 * r) for r, x in enumerate(sets.shared_keys)) <= d / eps * 1.01
    # Causal x^2 brute force: every heavy entry is in its block's set, and heavy_entries lists them.
    S = np.tril((q.astype(np.float64) @ k.T.astype(np.float64)) ** 2)
    A = S / S.sum(1, keepdims=True)
    heavy = list(zip(*np.nonzero(A >= eps * (1 + 1e-6))))
    assert len(heavy) > 100
    assert all(j in set(sets.shared_keys[i // 256].tolist()) for i, j in heavy)
    h = levattn.heavy_entries(q, k, eps, causal=True)
    got = {(int(a), int(b)) for a, b in zip(h.queries, h.keys)}
    assert {(int(a), int(b)) for a, b in heavy} <= got
    assert all(A[a, b] >= eps * (1 - 1e-6) for a, b in got)
    with pytest.raises(ValueError, match="as many queries as keys"):
        levattn.attention(q[:500], k, v, causal=True)
    with pytest.raises(ValueError, match="causal"):
        levattn.heavy_entries(q, k, eps, causal=True, p=3.0)


def test_kv_cache_decodes_over_its_kept_keys_with_grouped_queries():
    g = rng(31)
    kv, qh, n, d, dv = 2, 4, 800, 6, 3
    cache = levattn.KVCache(1, kv, d, dv, eps=0.1, window=8, sinks=2, prune_every=64, keep_full=True)
    k = (g.standard_normal((1, kv, n, d)) * np.exp(g.standard_normal((1, kv, n, 1)))).astype(np.float32)
    v = g.standard_normal((1, kv, n, dv)).astype(np.float32)
    for t0 in range(0, n, 100):
        cache.append(k[:, :, t0:t0 + 100], v[:, :, t0:t0 + 100])
    assert cache.tokens == n
    q = g.standard_normal((1, qh, 1, d)).astype(np.float32)
    out, rep = cache.attend(q, report_mass=True)
    assert out.shape == (1, qh, 1, dv)
    for h in range(qh):
        kept = cache.kept(0, h // 2)
        assert len(kept) < n and {0, 1} <= set(kept.tolist()) and set(range(n - 8, n)) <= set(kept.tolist())
        np.testing.assert_allclose(out[0, h], dense_softmax(q[0, h], k[0, h // 2, kept], v[0, h // 2, kept]),
                                   rtol=1e-5, atol=1e-6)
        s = (q[0, h].astype(np.float64) @ k[0, h // 2].T.astype(np.float64))[0]
        np.testing.assert_allclose(rep["x2_mass"][h], np.sum(s[kept] ** 2) / np.sum(s ** 2), rtol=1e-9)
        w = np.exp(s / np.sqrt(d) - np.max(s / np.sqrt(d)))
        np.testing.assert_allclose(rep["kernel_mass"][h], np.sum(w[kept]) / np.sum(w), rtol=1e-9)
    assert list(rep["kept"]) == [len(cache.kept(0, h)) for h in range(kv)]
    with pytest.raises(ValueError, match="multiple of 2"):
        cache.attend(g.standard_normal((1, 3, 1, d)).astype(np.float32))
    with pytest.raises(ValueError, match="values"):
        cache.append(k[:, :, :5], v[:, :, :4])


def test_the_library_refuses_a_ridge_where_it_does_not_apply():
    # Ridge scores are leverage scores (p = 2); neither the |x|^p bounds nor a heavy-entry search
    # (whose sets would miss heavy entries) take one, and the error says so instead of dropping it.
    r = rng(23)
    q = r.standard_normal((40, 6)).astype(np.float32)
    k = r.standard_normal((80, 6)).astype(np.float32)
    ridge = levattn.LeverageOptions(ridge=1.0)
    assert len(levattn.universal_set(k, 0.1, leverage=ridge).indices) > 0  # p = 2: ridge scores
    with pytest.raises(ValueError, match="ridge"):
        levattn.universal_set(k, 0.1, p=3.0, leverage=ridge)
    with pytest.raises(ValueError, match="ridge"):
        levattn.heavy_entries(q, k, 0.1, leverage=ridge)
    with pytest.raises(ValueError, match="causal"):
        levattn.heavy_entries(k, k, 0.1, p=3.0, causal=True)


def test_selection_keywords_of_old_are_refused_with_their_spec():
    q = np.ones((6, 4), np.float32)
    with pytest.raises(TypeError, match=re.escape('select="leverage:32+window:4+sinks:2"')):
        levattn.attention(q, q, q, select="leverage", top_k=32, window=4, sinks=2)
    with pytest.raises(TypeError, match=re.escape('select="cluster:8+probe:3"')):
        levattn.select_keys(q, q, "cluster", top_k=8, cluster={"probe": 3})
    with pytest.raises(TypeError, match=re.escape('select="leverage:4+method:sketch+sketch_size:64"')):
        levattn.attention(q, q, q, "leverage", top_k=4, leverage=levattn.LeverageOptions(method="sketch", sketch_size=64))
    with pytest.raises(TypeError, match=re.escape('select="NAME[:BUDGET][+FIELD:VALUE...]"')):
        levattn.attention(q, q, q, "leverage", kernel="gaussian")  # no spec to give: the form instead
    with pytest.raises(TypeError, match="unexpected keyword argument 'topk'"):
        levattn.attention(q, q, q, topk=3)
