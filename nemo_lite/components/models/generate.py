"""Greedy decoding without a KV cache: every step reruns the whole prefix. For tests and smoke checks."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module, input_ids_BS: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None
) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids_BS`` ``[B, S]``; returns ``[B, S + n]``.

    With ``eos_token_id``, stops early once every row has produced it (rows that finished first keep
    receiving eos, as transformers pads them). The model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    ids_BS = input_ids_BS
    done_B = torch.zeros(ids_BS.shape[0], dtype=torch.bool, device=ids_BS.device)
    try:
        for _ in range(max_new_tokens):
            next_B = model(ids_BS)[:, -1].argmax(dim=-1)
            if eos_token_id is not None:
                next_B = next_B.masked_fill(done_B, eos_token_id)
                done_B |= next_B == eos_token_id
            ids_BS = torch.cat([ids_BS, next_B[:, None]], dim=1)
            if eos_token_id is not None and bool(done_B.all()):
                break
    finally:
        model.train(was_training)
    return ids_BS
