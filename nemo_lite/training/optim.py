"""AdamW's parameter groups and state loading, and the learning-rate schedule (linear warmup, then cosine
decay to a floor). Each training step builds its own optimizer (:mod:`nemo_lite.training.step`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from nemo_lite.training.config import OptimSection


class OwnKernelFlags:
    """An optimizer mixin: a loaded state dict keeps this optimizer's kernel flags (``fused``, ``foreach``,
    ``capturable``), which torch would take from the saved groups, and each ``step`` count goes where this
    kernel reads it. So a checkpoint of the plain step resumes under the fast one, and the other way round."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        kept = [{k: group[k] for k in ("fused", "foreach", "capturable")} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flags in zip(self.param_groups, kept, strict=True):
            group.update(flags)
            on_device = bool(group["fused"] or group["capturable"])
            for param in group["params"]:
                state = self.state.get(param, {})
                if "step" in state:
                    where = param.device if on_device else torch.device("cpu")
                    state["step"] = state["step"].to(device=where, dtype=torch.float32)


class AdamW(OwnKernelFlags, torch.optim.AdamW):
    """torch's AdamW, whose loaded state keeps its own kernel flags (:class:`OwnKernelFlags`)."""


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; norms, biases and other vectors are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=cfg.warmup_steps, max_steps=max_steps, min_lr_ratio=cfg.min_lr_ratio),
    )
