"""levattn inside other libraries' models.

- ``levattn.integrations.transformers``: an attention backend for Hugging Face transformers
  (``attn_implementation="levattn"``), its mask function, the per-layer selection, and a
  transformers ``Cache`` of bounded memory built on ``levattn.KVCache``.
- ``levattn.integrations.flex``: a FlexAttention ``BlockMask`` made from a levattn selection.
- ``levattn.integrations.kvpress``: ``LevAttentionPress``, a kvpress ``ScorerPress`` scoring keys
  by leverage.

Each module imports its library when it is imported, not before: ``import levattn`` needs
neither transformers nor kvpress.
"""
