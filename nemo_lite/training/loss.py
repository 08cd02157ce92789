"""Cross-entropy over packed tokens (ignore_index -100), summed so gradient accumulation is exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def cross_entropy_sum(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """Sum of token losses in float32 (the caller divides by the step's token count)."""
    return F.cross_entropy(
        logits_BSV.reshape(-1, logits_BSV.shape[-1]).float(),
        labels_BS.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def _chunk_loss(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    logits = hidden_TH @ weight_VH.t()
    return F.cross_entropy(logits.float(), labels_T, ignore_index=IGNORE_INDEX, reduction="sum")


def fused_head_cross_entropy_sum(
    hidden_BSH: torch.Tensor, weight_VH: torch.Tensor, labels_BS: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """Output projection + cross-entropy over chunks of tokens, recomputed in backward.

    Only one chunk's float32 logits ``[chunk_tokens, V]`` ever exist, instead of ``[B*S, V]`` (for a
    128k vocabulary and 8k tokens that is 4 GiB of float32 logits saved for backward, avoided).
    """
    hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
    labels_T = labels_BS.reshape(-1)
    total = hidden_TH.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_TH.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(_chunk_loss, hidden_TH[sl], weight_VH, labels_T[sl], use_reentrant=False)
    return total
