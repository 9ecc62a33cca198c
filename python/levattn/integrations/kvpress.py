"""LevAttentionPress: a kvpress ScorerPress that keeps the keys of largest leverage score.

kvpress (NVIDIA's KV-cache compression library) prunes the cache once the prompt is prefilled;
a ScorerPress scores each cached key per layer and kv head and keeps the highest-scoring ones.
LevAttentionPress scores key j of each (batch, kv head) by its leverage score against that
head's keys, tau_j = k_j^T (K^T K)^+ k_j (exact, as levattn.leverage_scores computes it, on the
keys the cache holds), and protects the first ``sinks`` and last ``window`` tokens as
levattn.KVCache does. Leverage bounds every query's x^2 attention to a key,
(q . k_j)^2 / ||K q||^2 <= tau_j, so the keys it drops are those no query can weigh heavily
under x^2 attention (math.md 1.1); for softmax the ranking is a heuristic, measured in
docs/models.md.

kvpress pins its own transformers range (kvpress 0.5.5: transformers < 5.3); it is tested with
transformers 4.57.6 in an environment of its own (python/requirements-kvpress.txt).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from kvpress.presses.scorer_press import ScorerPress

from .. import _core

__all__ = ["LevAttentionPress"]


def leverage_scores(keys: torch.Tensor) -> torch.Tensor:
    """(batch, kv_heads, n) leverage scores of keys (batch, kv_heads, n, d), float32, each in [0, 1].
    O(batch kv_heads n d^2)."""
    k = keys.detach().float().cpu().contiguous().numpy()
    out = torch.empty(keys.shape[:3], dtype=torch.float32)
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            out[b, h] = torch.from_numpy(_core.leverage_scores(k[b, h]).scores)
    return out.to(keys.device)


@dataclass
class LevAttentionPress(ScorerPress):
    """Keeps (1 - compression_ratio) of each layer's and kv head's cached keys: the first `sinks`
    and last `window` tokens, then the keys of largest leverage score. Scores (batch, kv_heads, n):
    leverage scores in [0, 1], protected tokens 2 (above every score)."""

    compression_ratio: float = 0.0
    window: int = 64
    sinks: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.window < 0 or self.sinks < 0:
            raise ValueError(f"window, sinks: expected integers >= 0, got {self.window}, {self.sinks}")

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> torch.Tensor:
        scores = leverage_scores(keys)
        n = keys.shape[-2]
        scores[..., :min(self.sinks, n)] = 2.0
        if self.window > 0:
            scores[..., max(0, n - self.window):] = 2.0
        return scores
