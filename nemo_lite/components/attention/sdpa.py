"""sdpa: ``torch.nn.functional.scaled_dot_product_attention``.

Pure causal attention passes ``is_causal=True`` and no mask, so PyTorch can pick the flash kernel.
Every other rule (documents, fixed blocks, windows) becomes a dense boolean mask built once per step,
which routes to the memory-efficient kernel (GPU) or the math kernel (CPU).

Sinks: sdpa has no sink argument and returns no log-sum-exp, so the sink is added as one more key.
Each query gets an extra coordinate equal to 1 and the sink key is ``[0, ..., 0, w_h / scale]``, so its
score is exactly ``w_h``; its value vector is zero. The result equals the softmax with the extra logit.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from nemo_lite.components.attention.base import AttentionBackend, check_qkv
from nemo_lite.components.attention.masks import AttentionMask, dense_mask
from nemo_lite.components.attention.registry import register_attention_backend


@register_attention_backend("sdpa")
class SDPAAttention(AttentionBackend):
    def describe(self, device_type: str) -> str:
        if self.attn_mask_type == "causal" and not self.fixed_block_size:
            return "sdpa: torch scaled_dot_product_attention with is_causal=True (a dense mask only for windows)"
        return "sdpa: torch scaled_dot_product_attention with a dense boolean mask per step"

    def _build_one(self, mask: AttentionMask, sliding_window: int) -> Any:
        if mask.doc_ids is None and not mask.fixed_block_size and sliding_window == 0:
            return None  # plain causal: is_causal=True, no mask tensor
        return dense_mask(
            mask.seq_len,
            doc_ids_BS=mask.doc_ids,
            fixed_block_size=mask.fixed_block_size,
            sliding_window=sliding_window,
            device=mask.device,
            branches=mask.branches,
        )

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
        groups = check_qkv(q, k, v, enable_gqa, sink_weights)
        allowed = self._mask_for(attention_mask, q, sliding_window)
        if sink_weights is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, is_causal=allowed is None, scale=scale, enable_gqa=groups > 1
            )
        return _sdpa_with_sinks(q, k, v, allowed, scale, sink_weights, groups)


def _sdpa_with_sinks(q, k, v, allowed, scale, sink_weights, groups):
    batch, heads, seq_len, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if groups > 1:  # each query head has its own sink key, so KV heads are expanded here
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    ones = q.new_ones(batch, heads, seq_len, 1)
    q_aug = torch.cat([q, ones], dim=-1)
    k_aug = torch.cat([k, torch.zeros_like(k[..., :1])], dim=-1)
    sink_key = torch.zeros(batch, heads, 1, head_dim + 1, dtype=k.dtype, device=k.device)
    sink_key = torch.cat(
        [
            sink_key[..., :-1],
            (sink_weights / scale).to(k.dtype).view(1, heads, 1, 1).expand(batch, -1, -1, -1),
        ],
        -1,
    )
    k_aug = torch.cat([sink_key, k_aug], dim=-2)
    v_aug = torch.cat([torch.zeros_like(v[:, :, :1]), v], dim=-2)
    if allowed is None:
        allowed = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()[None, None]
    sink_col = torch.ones(*allowed.shape[:-1], 1, dtype=torch.bool, device=allowed.device)
    allowed = torch.cat([sink_col, allowed], dim=-1)
    return F.scaled_dot_product_attention(q_aug, k_aug, v_aug, attn_mask=allowed, scale=scale)
