"""eager: attention written out in float32 matmul/softmax. The readable definition; slow, exact."""

from __future__ import annotations

import torch

from nemo_lite.components.attention.base import AttentionBackend, attention_math
from nemo_lite.components.attention.masks import AttentionMask
from nemo_lite.components.attention.registry import register_attention_backend


@register_attention_backend("eager")
class EagerAttention(AttentionBackend):
    """Materializes the ``[B, H, S, S]`` scores; every mask rule, sinks and GQA on any device."""

    def describe(self, device_type: str) -> str:
        return "eager: matmul + softmax written out in float32 (materializes the [B, H, S, S] scores)"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        sink_weights: torch.Tensor | None = None,
        sliding_window: int = 0,
        enable_gqa: bool = False,
        attention_mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        allowed = self._mask_for(attention_mask, q, sliding_window)
        return attention_math(q, k, v, allowed, scale=scale, sink_weights=sink_weights, enable_gqa=enable_gqa)
