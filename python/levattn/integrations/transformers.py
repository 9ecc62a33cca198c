"""levattn as a Hugging Face transformers attention backend (transformers 5, tested with 5.18).

Two lines switch a model::

    from levattn.integrations import transformers as lt
    model = AutoModel.from_pretrained(path, attn_implementation=lt.register())
    lt.set_selection(model, "leverage:32+window:4+sinks:2")

``register()`` puts levattn in both of transformers' registries: ``AttentionInterface`` (the
attention function) and ``AttentionMaskInterface`` (the mask function). The mask function is
what keeps causality: it hands the attention function a ``KeyLayout`` (causal or not, the sliding
window, the key padding) instead of an (m, n) mask, which levattn never builds. The selection is
an attribute of each attention module, so ``set_selection`` changes it, per model or per layer,
with no reload. Attention patterns outside bidirectional, causal and causal sliding-window
(with key padding) raise NotImplementedError when the model builds its mask.

``LevAttentionCache`` is a transformers ``Cache`` whose layers are ``levattn.KVCache`` objects:
``generate()`` with it holds per layer and kv head only the keys some later query can find
eps-heavy (plus the last ``window`` and first ``sinks`` tokens), whatever the context length.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AttentionInterface
from transformers.cache_utils import (DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin,
                                      get_layer_types_and_kwargs)
from transformers.masking_utils import (AttentionMaskInterface, bidirectional_mask_function, causal_mask_function,
                                        prepare_padding_mask)

from .. import _core
from ..torch import _spec, lev_attention

__all__ = ["NAME", "register", "set_selection", "selection_of", "attention_forward", "mask_interface", "KeyLayout",
           "LevAttentionCache"]

NAME = "levattn"
_ATTRIBUTE = "levattn_selection"
_DEFAULT = "full"


# -- registration and the selection ---------------------------------------------------------------

def register(name: str = NAME) -> str:
    """Registers levattn's attention and mask functions under `name` (idempotent) and returns it,
    for ``from_pretrained(..., attn_implementation=register())`` or
    ``model.set_attn_implementation(register())``."""
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, mask_interface)
    return name


def _attention_modules(model: torch.nn.Module):
    """The modules that call the attention function: each has a layer index (every transformers
    attention module does) and a config naming the attention implementation."""
    for module in model.modules():
        if isinstance(getattr(module, "layer_idx", None), int) and hasattr(module, "config") \
                and "Attention" in type(module).__name__:
            yield module


def set_selection(model: torch.nn.Module, select: str, *, layers=None, **retired) -> None:
    """Sets the selection of `model`'s attention layers (all, or the layer indices in `layers`) to
    the spec `select`, as ``levattn.torch.lev_attention`` takes it ("leverage:32+window:4+sinks:2").
    Takes effect at the next forward call; no reload. Layers never given a selection use "full"
    (exact attention). ValueError on a spec the library rejects, a layer index the model lacks, or
    a model without attention layers; the keywords of old (top_k=, ...) are a TypeError giving
    their spec."""
    spec = _spec(select, "set_selection", retired)
    _core.selection_layout(spec, None, False, (1,) * 7)  # the library's own checks, now, not at the first call
    modules = list(_attention_modules(model))
    if not modules:
        raise ValueError(f"set_selection: {type(model).__name__} has no attention layers levattn can drive")
    indices = {m.layer_idx for m in modules}
    chosen = indices if layers is None else set(int(i) for i in layers)
    missing = sorted(chosen - indices)
    if missing:
        raise ValueError(f"set_selection: layers {missing} are not in the model (its layers: 0 .. {max(indices)})")
    for module in modules:
        if module.layer_idx in chosen:
            setattr(module, _ATTRIBUTE, spec)


def selection_of(module: torch.nn.Module) -> str:
    """The selection spec an attention module runs with ("full" when none was set)."""
    return getattr(module, _ATTRIBUTE, _DEFAULT)


# -- the mask function ----------------------------------------------------------------------------

@dataclass(frozen=True)
class KeyLayout:
    """What levattn's mask function hands the attention function in place of an (m, n) mask.

    causal: query i (absolute position q_offset + i) sees keys at positions <= its own; window:
    with causal, only the `window` newest of them (transformers' sliding window: positions
    i - window + 1 .. i), None for all; key_padding: (batch, kv_length) bool, True where the key
    takes part, None when none is padded; padded: whether the model's 2-D mask pads any token
    (also outside this call's keys); key positions are kv_offset .. kv_offset + kv_length - 1.
    """
    causal: bool
    window: Optional[int]
    key_padding: Optional[torch.Tensor]
    padded: bool
    q_offset: int
    kv_offset: int
    kv_length: int


def _sliding_window_of(mask_function, local_size):
    """The window of transformers' causal sliding-window mask function, else None."""
    cells = getattr(mask_function, "__closure__", None) or ()
    parts = next((c.cell_contents for c in cells if isinstance(c.cell_contents, tuple)), ())
    overlay = [f for f in parts if getattr(f, "__qualname__", "").startswith("sliding_window_overlay.")]
    if len(parts) == 2 and causal_mask_function in parts and overlay:
        window = local_size
        if window is None:
            inner = dict(zip(overlay[0].__code__.co_freevars, (c.cell_contents for c in overlay[0].__closure__)))
            window = inner.get("sliding_window")
        return int(window) if window is not None else None
    return None


def mask_interface(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                   attention_mask=None, local_size=None, **kwargs) -> KeyLayout:
    """levattn's entry in transformers' AttentionMaskInterface: a KeyLayout, O(batch kv_length).

    Takes bidirectional, causal and causal sliding-window mask functions, each with the model's
    2-D padding mask (batch, tokens); anything else (packed sequences, block overlays, chunked
    attention, or_mask / and_mask functions) raises NotImplementedError, since levattn would
    otherwise compute a different attention than the model asks for.
    """
    if mask_function is bidirectional_mask_function:
        causal, window = False, None
    elif mask_function is causal_mask_function:
        causal, window = True, None
    else:
        causal, window = True, _sliding_window_of(mask_function, local_size)
        if window is None:
            name = getattr(mask_function, "__qualname__", repr(mask_function))
            raise NotImplementedError(
                f"levattn: the model's attention mask ({name}) is not one levattn computes; it takes bidirectional, "
                "causal and causal sliding-window attention with key padding (use attn_implementation='sdpa' here)")
    padding, padded = None, False
    if attention_mask is not None:
        attention_mask = attention_mask.to(torch.bool)
        padded = not bool(attention_mask.all())
        if padded:
            padding = prepare_padding_mask(attention_mask, int(kv_length), int(kv_offset))
            padding = padding[:, int(kv_offset):int(kv_offset) + int(kv_length)]
    return KeyLayout(causal, window, padding, padded, int(q_offset), int(kv_offset), int(kv_length))


# -- the attention function -----------------------------------------------------------------------

def _layout_of(attention_mask, module, query, key, is_causal) -> KeyLayout:
    """The KeyLayout of an attention call whose mask did not come from levattn's mask function:
    None (causality from the module, as SDPA decides it) or an SDPA key-padding mask."""
    m, n = query.shape[-2], key.shape[-2]
    causal = m > 1 and bool(getattr(module, "is_causal", False) if is_causal is None else is_causal)
    if attention_mask is None:
        return KeyLayout(causal, None, None, False, n - m if causal else 0, 0, n)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4 and attention_mask.shape[-2] == 1:
        keep = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        keep = keep.reshape(keep.shape[0], n)
        return KeyLayout(False, None, keep, not bool(keep.all()), 0, 0, n)
    raise ValueError(f"levattn: attention_mask of type {type(attention_mask).__name__} and shape "
                     f"{tuple(getattr(attention_mask, 'shape', ()))}: expected levattn's KeyLayout (the model built with "
                     f"attn_implementation='{NAME}' after register()), None or a (batch, 1, 1, n) key-padding mask")


def _keys_of_window(layout: KeyLayout, key, value, padding):
    """One query with a sliding window: the keys at positions q - window + 1 .. q only."""
    first = layout.q_offset - layout.window + 1 - layout.kv_offset
    if first > 0:
        key, value = key[..., first:, :], value[..., first:, :]
        padding = None if padding is None else padding[..., first:]
    return key, value, padding


def _grouped(query, key, value, head_valid, **kwargs):
    """Attention with a key mask per (batch, kv head): each kv head's group of query heads becomes
    one batch entry, so the mask is a key-padding mask of that entry."""
    b, h, m, d = query.shape
    kv_heads, n = key.shape[1], key.shape[2]
    group = h // kv_heads
    out = lev_attention(query.reshape(b * kv_heads, group, m, d), key.reshape(b * kv_heads, 1, n, d),
                        value.reshape(b * kv_heads, 1, n, value.shape[-1]),
                        attn_mask=head_valid.reshape(b * kv_heads, 1, 1, n), enable_gqa=group > 1, **kwargs)
    return out.reshape(b, h, m, value.shape[-1])


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """levattn's entry in transformers' AttentionInterface.

    query (batch, heads, m, d), key (batch, kv_heads, n, d), value (batch, kv_heads, n, dv), kv_heads
    dividing heads; attention_mask the KeyLayout of ``mask_interface``. Returns (out (batch, m,
    heads, dv), None) as transformers' SDPA function does, computed by lev_attention with the
    module's selection (``selection_of(module)``), the model's scaling, its causality and key
    padding (a padded key is never selected nor attended). Sliding-window layers attend their
    window exactly (``select="window:W"``), whatever the selection: the window already bounds the
    keys. One query (decoding) attends the keys the cache returns, under the same selection.
    Attention dropout is not applied (a warning says so once); attention weights are not returned.
    """
    if dropout:
        warnings.warn("levattn applies no attention dropout; the model's attention dropout is skipped", stacklevel=2)
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError("levattn: attention with a position bias (T5-style) is not supported")
    layout = attention_mask if isinstance(attention_mask, KeyLayout) else _layout_of(attention_mask, module, query,
                                                                                     key, is_causal)
    m, n = query.shape[-2], key.shape[-2]
    select = selection_of(module)
    padding = layout.key_padding
    head_valid = _HEAD_VALID.pop(id(key), None)
    if head_valid is not None and layout.padded:
        raise ValueError("levattn: LevAttentionCache takes batches without padding (generate one row per call, or "
                         "rows of one length)")
    if head_valid is not None and layout.window is not None:
        raise NotImplementedError("levattn: a LevAttentionLayer under a sliding-window layer (LevAttentionCache gives "
                                  "those layers transformers' sliding-window layer)")
    if head_valid is not None and bool(head_valid.all()):
        head_valid = None
    causal = layout.causal and m > 1
    if layout.causal and m > 1 and (m != n or layout.q_offset != layout.kv_offset):
        raise NotImplementedError(f"levattn: causal attention of {m} queries against {n} keys (queries after a "
                                  "cache: chunked prefill) is not supported; prefill the prompt in one call")
    if layout.window is not None:
        if m == 1:
            key, value, padding = _keys_of_window(layout, key, value, padding)
            select = "full"
        else:
            select = f"window:{layout.window - 1}"
    common = dict(is_causal=causal, scale=scaling, select=select)
    if head_valid is not None:
        out = _grouped(query, key, value, head_valid, **common)
    else:
        mask = None if padding is None else padding[:, None, None, :]
        out = lev_attention(query, key, value, attn_mask=mask, enable_gqa=key.shape[1] != query.shape[1], **common)
    return out.transpose(1, 2).contiguous(), None


# -- the bounded cache ----------------------------------------------------------------------------

# Keys a LevAttentionCache layer returned whose kv heads keep different numbers of keys: id of
# the key tensor -> (batch, kv_heads, n) bool, True where the slot holds a kept key. Read (and
# removed) by the attention call that receives that tensor right after update().
_HEAD_VALID: dict = {}


class LevAttentionLayer(CacheLayerMixin):
    """One layer of LevAttentionCache: a levattn.KVCache (which decides what is kept) and the kept
    keys and values as tensors (batch, kv_heads, L, d), L the most any kv head keeps, with a mask
    of the slots in use. Memory O(kv_heads (d / eps + prune_every + window + sinks)(d + dv)) per
    batch row, whatever the number of tokens."""

    is_sliding = False
    is_compileable = False

    def __init__(self, eps=0.01, window=64, sinks=4, prune_every=256):
        super().__init__()
        self.options = dict(eps=eps, window=window, sinks=sinks, prune_every=prune_every)
        self.cache = None

    def lazy_initialization(self, key_states, value_states):
        b, kv_heads, _, d = key_states.shape
        self.cache = _core.KVCache(b, kv_heads, d, value_states.shape[-1], **self.options)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(b, kv_heads, 0, d)
        self.values = value_states.new_zeros(b, kv_heads, 0, value_states.shape[-1])
        self.tokens = torch.zeros(b, kv_heads, 0, dtype=torch.int64)
        self.valid = torch.zeros(b, kv_heads, 0, dtype=torch.bool)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Returns the kept keys and values followed by the new ones (with their slot mask passed
        to the attention call when kv heads keep different numbers), then appends the new tokens to
        the KVCache and keeps what it keeps."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        _HEAD_VALID.clear()  # at most one pending entry: the previous attention call has read its own
        b, kv_heads, t, _ = key_states.shape
        first = self.cache.tokens
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        tokens = torch.cat([self.tokens, torch.arange(first, first + t).expand(b, kv_heads, t)], dim=-1)
        valid = torch.cat([self.valid, torch.ones(b, kv_heads, t, dtype=torch.bool)], dim=-1)
        self.cache.append(key_states.detach().float().contiguous().numpy(),
                          value_states.detach().float().contiguous().numpy())
        self._keep(keys.detach(), values.detach(), tokens, valid)
        _HEAD_VALID[id(keys)] = valid
        return keys, values

    def _keep(self, keys, values, tokens, valid):
        b, kv_heads = keys.shape[:2]
        kept = [[torch.from_numpy(self.cache.kept(i, h)) for h in range(kv_heads)] for i in range(b)]
        longest = max(len(x) for row in kept for x in row)
        self.keys = keys.new_zeros(b, kv_heads, longest, keys.shape[-1])
        self.values = values.new_zeros(b, kv_heads, longest, values.shape[-1])
        self.tokens = torch.zeros(b, kv_heads, longest, dtype=torch.int64)
        self.valid = torch.zeros(b, kv_heads, longest, dtype=torch.bool)
        for i in range(b):
            for h in range(kv_heads):
                at = valid[i, h]
                slots = torch.searchsorted(tokens[i, h][at], kept[i][h])
                c = len(slots)
                self.keys[i, h, :c] = keys[i, h][at][slots]
                self.values[i, h, :c] = values[i, h][at][slots]
                self.tokens[i, h, :c] = kept[i][h]
                self.valid[i, h, :c] = True

    def get_mask_sizes(self, query_length):
        return self.keys.shape[-2] + query_length if self.is_initialized else query_length, 0

    def get_seq_length(self):
        return self.cache.tokens if self.cache is not None else 0

    def get_max_length(self):
        return -1

    def reset(self):
        self.cache = None
        self.keys = self.values = None
        self.is_initialized = False

    @property
    def kept_tokens(self) -> int:
        """Key slots held per (batch, kv head): the most any kv head keeps."""
        return self.keys.shape[-2] if self.is_initialized else 0

    @property
    def bytes(self) -> int:
        """Bytes this layer holds: the KVCache's and the kept tensors'."""
        if not self.is_initialized:
            return 0
        held = (self.keys, self.values, self.tokens, self.valid)
        return self.cache.bytes + sum(t.numel() * t.element_size() for t in held)


class LevAttentionCache(Cache):
    """A transformers Cache of bounded memory: a LevAttentionLayer (a levattn.KVCache) for each
    full-attention layer of `config`, transformers' own layer for the others (a sliding-window
    layer holds its window; other kinds as DynamicCache makes them). A key is evicted only when its leverage score against every
    key so far is below eps, so no later query finds it eps-heavy under x^2 attention; the last
    `window` and first `sinks` tokens are always kept. For ``model.generate(...,
    past_key_values=LevAttentionCache(model.config, eps=0.02))`` with attn_implementation="levattn";
    the prompt is prefilled in one call, batches without padding."""

    def __init__(self, config, *, eps=0.01, window=64, sinks=4, prune_every=256):
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        super().__init__(layers=[LevAttentionLayer(eps, window, sinks, prune_every) if kind == "full_attention"
                                 else DYNAMIC_LAYER_TYPE_MAPPING[kind](**layer_kwargs) for kind in layer_types])

    @property
    def bytes(self) -> int:
        """Bytes all layers hold."""
        def held(layer):
            if isinstance(layer, LevAttentionLayer):
                return layer.bytes
            tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
            return sum(t.numel() * t.element_size() for t in tensors)
        return sum(held(layer) for layer in self.layers)
