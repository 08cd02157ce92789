"""Attention backends behind one registry, the mask rules they share, and the spec that picks one
(:class:`AttentionConfig`).

Importing this package registers the built-in backends: eager, sdpa, flex and varlen.
"""

from nemo_lite.components.attention import eager, flex_attention, sdpa, varlen  # noqa: F401  (registers)
from nemo_lite.components.attention.base import AttentionBackend, AttentionConfigError, attention_math
from nemo_lite.components.attention.config import AttentionConfig, as_attention_config
from nemo_lite.components.attention.masks import (
    FLEX_ATTN_MASK_T,
    MASK_TYPES,
    AttentionMask,
    dense_mask,
    document_ids,
)
from nemo_lite.components.attention.registry import (
    UnknownAttentionBackendError,
    build_attention_backend,
    get_attention_backend,
    list_attention_backends,
    register_attention_backend,
    unregister_attention_backend,
)

__all__ = [
    "FLEX_ATTN_MASK_T",
    "MASK_TYPES",
    "AttentionBackend",
    "AttentionConfig",
    "AttentionConfigError",
    "AttentionMask",
    "UnknownAttentionBackendError",
    "as_attention_config",
    "attention_math",
    "build_attention_backend",
    "dense_mask",
    "document_ids",
    "get_attention_backend",
    "list_attention_backends",
    "register_attention_backend",
    "unregister_attention_backend",
]
