"""Output projection + cross-entropy over packed tokens (ignore_index -100), summed so gradient
accumulation is exact (the trainer divides by the step's label count).

With a 128k vocabulary this is one of the costliest parts of a small model's step: eager PyTorch
writes float32 logits, a float32 log-softmax, and a dense one-hot gradient, each ``tokens x vocab``.
Compiled (``trainer.compile=true``), the projection, the float32 upcast, the log-sum-exp and its
gradient fuse, and float32 logits never reach memory. ``trainer.loss_chunk_size`` additionally cuts
the tokens into chunks recomputed in backward, so only one chunk's logits exist at a time.
The fast step can replace it with a Triton kernel (:mod:`nemo_lite.training.fast`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nemo_lite.errors import IGNORE_INDEX


def head_cross_entropy_sum(hidden_TH: torch.Tensor, weight_VH: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of -log softmax(hidden @ weight^T)[label], in float32."""
    logits_TV = hidden_TH @ weight_VH.t()
    acc = torch.promote_types(logits_TV.dtype, torch.float32)  # float32, or float64 for float64 inputs
    return F.cross_entropy(logits_TV.to(acc), labels_T, ignore_index=IGNORE_INDEX, reduction="sum")


_compiled_head_loss: Callable | None = None


def head_loss_fn(compiled: bool) -> Callable:
    """The head loss, compiled once per process when asked."""
    global _compiled_head_loss
    if not compiled:
        return head_cross_entropy_sum
    if _compiled_head_loss is None:
        _compiled_head_loss = torch.compile(head_cross_entropy_sum, dynamic=False)
    return _compiled_head_loss


def cross_entropy_sum(
    hidden_BSH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_BS: torch.Tensor,
    *,
    chunk_tokens: int = 0,
    compiled: bool = False,
) -> torch.Tensor:
    """Summed token loss of ``hidden @ weight^T`` against ``labels``; chunked when ``chunk_tokens > 0``."""
    hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
    labels_T = labels_BS.reshape(-1)
    loss_fn = head_loss_fn(compiled)
    if chunk_tokens <= 0 or chunk_tokens >= hidden_TH.shape[0]:
        return loss_fn(hidden_TH, weight_VH, labels_T)
    total = hidden_TH.new_zeros((), dtype=torch.promote_types(hidden_TH.dtype, torch.float32))
    for start in range(0, hidden_TH.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        total = total + checkpoint(loss_fn, hidden_TH[sl], weight_VH, labels_T[sl], use_reentrant=False)
    return total


def forward_hidden(model: nn.Module, batch: dict[str, torch.Tensor], mask: Any) -> torch.Tensor:
    """The batch's final hidden states ``[B, S, hidden]``."""
    return model.forward_hidden(batch["input_ids"], position_ids=batch.get("position_ids"), attention_mask=mask)
