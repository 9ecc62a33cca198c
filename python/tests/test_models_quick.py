"""The pretrained-model experiment (docs/models.md) end to end on a few passages: the texts are
passages of 64-512 tokens, the full selection reproduces the SDPA embeddings, and a selection's
row carries every measured field."""
import json
import os
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))
import minilm  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return minilm.load_model()


def test_passages_are_64_to_512_tokens(model):
    tok = model[0]
    texts = minilm.passages(tok, 12)
    lengths = [len(tok(t, truncation=True, max_length=512)["input_ids"]) for t in texts]
    assert len(texts) == 12 and min(lengths) >= 64 and max(lengths) == 512


def test_full_selection_reproduces_the_model(model):
    tok, ref, ours, lt = model
    texts = minilm.passages(tok, 8)
    lt.set_selection(ours, "full")
    want, got = minilm.embed(ref, tok, texts, batch=4), minilm.embed(ours, tok, texts, batch=4)
    assert float((want * got).sum(-1).min()) > 1 - 1e-6


def test_quality_writes_every_field(tmp_path):
    out = tmp_path / "q.json"
    minilm.quality(SimpleNamespace(texts=8, budgets=[8], selections="leverage,window+sinks", out=str(out)))
    data = json.loads(out.read_text())
    assert data["texts"] == 8 and [r["selection"] for r in data["rows"]] == ["leverage", "window+sinks"]
    for r in data["rows"]:
        assert -1 <= r["cos_p5"] <= r["cos_mean"] <= 1 and 0 <= r["knn10_overlap"] <= 1


def test_layers_exact_top_k_keeps_the_most_mass(tmp_path):
    # Per layer, through levattn.evaluate at the model's scale: no selection of at most k keys per
    # query keeps more softmax mass than the exact top-k.
    out = tmp_path / "l.json"
    minilm.layers(SimpleNamespace(texts=2, budgets=[8], out=str(out)))
    rows = json.loads(out.read_text())["rows"]
    assert sorted({r["layer"] for r in rows}) == list(range(6))
    for layer in range(6):
        mine = {r["selection"]: r for r in rows if r["layer"] == layer}
        assert set(mine) == set(minilm.SELECTIONS)
        for name, r in mine.items():
            assert r["keys_per_query"] <= 8 + 1e-9, name
            assert 0 < r["softmax_mass"] <= mine["topk"]["softmax_mass"] + 1e-6, name
