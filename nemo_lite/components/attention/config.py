"""``AttentionConfig``: the one object that says how a model attends (backend, mask, its options).

It is the schema of a recipe's ``attention:`` group (Hydra composes ``configs/attention/*.yaml`` onto it,
as :class:`~nemo_lite.components.datasets.config.DataConfig` is the ``data:`` schema) and the only attention
argument of a model family, a model class, ``from_pretrained`` and the LoRA merge. A model builds its backend
from it once (:meth:`AttentionConfig.build`); everything after that asks the model's backend.

    attention = AttentionConfig(backend="flex", attn_mask_type="block_causal")
    model = LlamaForCausalLM(config, attention=attention)
    model.attention_backend.describe("cuda")                   # the line the trainer logs

Only OmegaConf-compatible types appear here (no unions beyond Optional).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nemo_lite.components.attention.base import AttentionBackend, AttentionConfigError, shared_prompt_refusal
from nemo_lite.components.attention.masks import MASK_TYPES
from nemo_lite.components.attention.registry import get_attention_backend


@dataclass(kw_only=True)
class AttentionConfig:
    """Which backend computes attention, under which mask rule, with which of its own options.

    The defaults are a plain model's (sdpa, causal); the recipes' ``attention:`` default is flex with
    block_causal masks (``configs/attention/flex.yaml`` on top of ``RecipeConfig``'s default).
    """

    # Registered backend name: flex | sdpa | eager | varlen (or any backend registered by the user).
    backend: str = "sdpa"
    # "block_causal" keeps packed documents apart; "causal" lets them see each other.
    attn_mask_type: str = "causal"
    # Optional extra cut every n tokens (n > 0); None = no cut.
    fixed_block_size: int | None = None
    # The backend's own options, passed to it by name; it refuses one it does not know (docs/attention.md).
    # flex: kernel_options (auto | torch); varlen: host_sync (true | false).
    options: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse, in one line naming the key and the valid values, an unknown backend
        (:class:`~nemo_lite.components.attention.registry.UnknownAttentionBackendError`, a ``KeyError``), or
        (:class:`AttentionConfigError`, a ``ValueError``) an unknown mask type or option, or a bad fixed block
        size or option value."""
        backend_cls = get_attention_backend(self.backend)
        if self.attn_mask_type not in MASK_TYPES:
            raise AttentionConfigError(
                f"attention.attn_mask_type={self.attn_mask_type!r} is not valid; choose one of: {', '.join(MASK_TYPES)}"
            )
        size = self.fixed_block_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise AttentionConfigError(
                f"attention.fixed_block_size={size!r} must be an integer > 0 (tokens per block), or null for none"
            )
        if not isinstance(self.options, Mapping):
            raise AttentionConfigError(
                f"attention.options={self.options!r} must be a mapping of the backend's option names to values"
            )
        backend_cls.check_options(self.options)
        if self.attn_mask_type == "shared_prompt" and not backend_cls.supports_shared_prompt:
            raise AttentionConfigError(shared_prompt_refusal(self.backend))
        if self.attn_mask_type == "shared_prompt" and size is not None:
            raise AttentionConfigError(
                f"attention.fixed_block_size={size} does not combine with attn_mask_type=shared_prompt; set it to null"
            )

    def check_run(self, *, seq_len: int, device_type: str) -> None:
        """Refuse, before any data or model work, a run the backend cannot serve (its own rule, one line)."""
        self.check()
        get_attention_backend(self.backend).check_run(seq_len=seq_len, device_type=device_type, options=self.options)

    def build(self) -> AttentionBackend:
        """The backend this config names, checked first (:meth:`check`)."""
        self.check()
        backend_cls = get_attention_backend(self.backend)
        return backend_cls(
            attn_mask_type=self.attn_mask_type, fixed_block_size=self.fixed_block_size, **dict(self.options)
        )


def as_attention_config(attention: AttentionConfig | None) -> AttentionConfig:
    """``attention``, or a plain model's default (sdpa, causal) when None; anything else is refused in one line."""
    if attention is None:
        return AttentionConfig()
    if not isinstance(attention, AttentionConfig):
        raise TypeError(
            f"attention must be an AttentionConfig (e.g. AttentionConfig(backend='flex', "
            f"attn_mask_type='block_causal')) or None, got {type(attention).__name__} {attention!r}"
        )
    return attention


__all__ = ["AttentionConfig", "as_attention_config"]
