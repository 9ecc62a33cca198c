"""LevAttentionPress in kvpress's own pipeline, on a random-weight Llama (grouped-query attention).

Runs in the kvpress environment (.venv-kvpress: transformers 4.57.6, kvpress 0.5.5). Oracles:
numpy's SVD for the leverage scores, the protected window and sinks, and the cache the pipeline
leaves, which must hold exactly the keys of the highest scores, in order.
"""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, pipeline

import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
from levattn.integrations.kvpress import LevAttentionPress, leverage_scores

WORDS = ("the a of to in and is was for on with as by at from it that this be are an or not have had "
         "one two three cache key value query head layer token model attention leverage score").split()


def tokenizer():
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config).eval()


def svd_leverage(k):
    u, s, _ = np.linalg.svd(k.astype(np.float64), full_matrices=False)
    u = u[:, s > s[0] * 1e-10]
    return (u * u).sum(axis=1)


def test_scores_are_svd_leverage_scores():
    keys = torch.randn(2, 3, 70, 8) * torch.linspace(0.1, 3.0, 70)[:, None]
    got = leverage_scores(keys)
    for b in range(2):
        for h in range(3):
            np.testing.assert_allclose(got[b, h].numpy(), svd_leverage(keys[b, h].numpy()), atol=1e-5)


def test_bad_protection_is_an_error():
    with pytest.raises(ValueError, match="window, sinks"):
        LevAttentionPress(compression_ratio=0.5, window=-1)


def test_pipeline_keeps_the_protected_and_highest_leverage_keys(model):
    press = LevAttentionPress(compression_ratio=0.6, window=8, sinks=2)
    seen = {}
    score = press.score

    def recording_score(module, hidden_states, keys, values, attentions, kwargs):
        out = score(module, hidden_states, keys, values, attentions, kwargs)
        seen[module.layer_idx] = (keys.detach().clone(), out.clone())
        return out

    press.score = recording_score
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer(), device="cpu")
    context = " ".join(WORDS[i % len(WORDS)] for i in range(0, 7 * 97, 7))
    cache = DynamicCache()
    answer = pipe(context, question="which key", press=press, cache=cache, max_new_tokens=5)["answer"]
    assert isinstance(answer, str)
    assert sorted(seen) == [0, 1]
    for layer, (keys, scores) in seen.items():
        n = keys.shape[-2]
        kept = int(n * (1 - 0.6))
        protected = torch.zeros(n, dtype=torch.bool)
        protected[:2] = protected[n - 8:] = True
        for b in range(keys.shape[0]):
            for h in range(keys.shape[1]):
                tau = svd_leverage(keys[b, h].numpy())
                np.testing.assert_allclose(scores[b, h][~protected].numpy(), tau[~protected.numpy()], atol=1e-5)
                assert bool((scores[b, h][protected] == 2.0).all())
        top = scores.topk(kept, dim=-1).indices
        expect = keys.gather(2, top[..., None].expand(-1, -1, -1, keys.shape[-1]))
        # The pipeline hands back the cache cropped to the compressed context.
        torch.testing.assert_close(cache.layers[layer].keys, expect)


def test_no_compression_changes_nothing(model):
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer(), device="cpu")
    context = " ".join(WORDS[i % len(WORDS)] for i in range(0, 5 * 60, 5))
    plain = pipe(context, question="one two", max_new_tokens=6)["answer"]
    pressed = pipe(context, question="one two", press=LevAttentionPress(compression_ratio=0.0), max_new_tokens=6)
    assert pressed["answer"] == plain
