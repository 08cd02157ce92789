"""Test helpers for the training steps (nemo_lite.training.step, nemo_lite.training.fast.step)."""

from __future__ import annotations

import torch
from torch import nn


def dense_gradients(step, model: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient as ``step``'s update will use it, as a dense float32 tensor: a bf16 weight
    copy's or float8 weight's gradient and an embedding's lookup rows materialized (the fast step's module
    swaps keep them off ``.grad``), added to the parameter's own. Costs a gradient's memory."""
    rows, copies, float8 = getattr(step, "rows", {}), getattr(step, "copies", {}), getattr(step, "float8", {})
    out = {}
    for name, param in model.named_parameters():
        lookups, copy = rows.get(param), copies.get(param, float8.get(param))
        grads = [
            lookups.dense() if lookups else param.grad,
            None if copy is None or copy.grad is None else copy.grad.float(),
        ]
        grads = [g for g in grads if g is not None]
        if grads:
            out[name] = grads[0] if len(grads) == 1 else grads[0] + grads[1]
    return out
