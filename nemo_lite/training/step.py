"""The training step's strategy: how the loss is computed and how the update is applied.

The trainer runs forward and backward through a :class:`TrainStep` and hands it the step's values; the
step clips, updates (or skips a non-finite step) and brings the values to the host in the step's one
host sync. :class:`PlainStep` is the reference, plain torch throughout, with the optimizer ``optim.name``
names (:mod:`nemo_lite.training.optimizers`); the fast step (:mod:`nemo_lite.training.fast.step`)
computes the same thing with fused kernels and module swaps. :mod:`nemo_lite.training.step_choice` picks
one by ``trainer.step_impl``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn

from nemo_lite.training.distributed import local_shard
from nemo_lite.training.loss import cross_entropy_sum, forward_hidden
from nemo_lite.training.optimizers import OptimSection, build_optimizer, get_optimizer


class TrainStep(Protocol):
    optimizer: torch.optim.Optimizer
    # One line: what this step runs (printed before training).
    description: str

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], mask: Any, grad_scale: Any = None) -> torch.Tensor:
        """The batch's summed token loss (forward and head), under the caller's autocast. ``grad_scale``: the
        gradient the sum will receive in backward, where the caller knows it (a kernel may use it)."""

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of this rank's gradients (of its local shards under FSDP2), a device scalar."""

    def apply(self, report: torch.Tensor, grad_norm: torch.Tensor, clip: float) -> list[float]:
        """Clip to ``clip`` (0 = off) with the global ``grad_norm``, update, and return ``report`` (a 1-d
        device tensor that starts with the step's loss sum and gradient norm) as host floats. A step whose
        loss sum or norm is non-finite changes nothing. The gradients are cleared."""

    def weights_changed(self) -> None:
        """The parameters were changed outside a step (a checkpoint was loaded)."""

    def nonfinite_weights(self) -> torch.Tensor:
        """A device scalar, 1.0 if the last update left a NaN or Inf in this rank's parameters, else 0.0. Read
        with the next step's values (no host sync of its own), and before every save."""


def nonfinite_flag(params: list[torch.Tensor]) -> torch.Tensor:
    """1.0 (a float32 device scalar) if any of ``params`` (their local shards) holds a NaN or Inf. One fused
    max-abs pass over the weights, queued on the device: nothing waits for it."""
    norms = torch._foreach_norm([local_shard(p.detach()) for p in params], float("inf"))
    return (~torch.isfinite(torch.stack([n.to(torch.float32) for n in norms]).max())).float()


def update_after_sync(
    optimizer: torch.optim.Optimizer,
    params: list[torch.Tensor],
    report: torch.Tensor,
    grad_norm: torch.Tensor,
    clip: float,
) -> tuple[list[float], bool]:
    """The plain update: read ``report`` on the host (the one host sync), then, when its loss sum and norm
    are finite, clip with ``clip_grad_norm_``'s factor and step. Returns the values and whether it stepped.
    The gradients are cleared."""
    values = report.tolist()
    stepped = math.isfinite(values[0]) and math.isfinite(values[1])
    if stepped:
        if clip > 0:  # clip_grad_norm_'s factor, on the local tensors (shards under FSDP2)
            grads = [local_shard(p.grad) for p in params if p.grad is not None]
            torch._foreach_mul_(grads, torch.clamp(clip / (grad_norm + 1e-6), max=1.0))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, stepped


class PlainStep:
    """The optimizer ``optim.name`` names and ``clip_grad_norm_``'s arithmetic; the update waits for the
    host to see the values. ``blocks``: the model's decoder blocks (``family.blocks(model)``), which tell an
    optimizer such as muon which matrices are the blocks'."""

    def __init__(
        self,
        model: nn.Module,
        optim: OptimSection,
        *,
        blocks: Sequence[nn.Module] = (),
        compile: bool = False,
        loss_chunk_size: int = 0,
    ):
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]  # not the frozen (LoRA base)
        self.optimizer = build_optimizer(model, optim, blocks)
        self.loss_kw = {"chunk_tokens": loss_chunk_size, "compiled": compile}
        summary = get_optimizer(optim.name).summary
        self.description = f"plain step: {summary}, clip_grad_norm_ arithmetic, torch cross-entropy"
        self._weights_bad: torch.Tensor | None = None

    def loss(self, model, batch, mask, grad_scale=None) -> torch.Tensor:
        return cross_entropy_sum(
            forward_hidden(model, batch, mask), model.output_weight, batch["labels"], **self.loss_kw
        )

    def grad_norm(self) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([local_shard(p.grad) for p in self.params if p.grad is not None])

    def apply(self, report: torch.Tensor, grad_norm: torch.Tensor, clip: float) -> list[float]:
        values, stepped = update_after_sync(self.optimizer, self.params, report, grad_norm, clip)
        if stepped:
            self._weights_bad = nonfinite_flag(self.params)
        return values

    def weights_changed(self) -> None:
        self._weights_bad = nonfinite_flag(self.params)

    def nonfinite_weights(self) -> torch.Tensor:
        if self._weights_bad is None:
            self._weights_bad = nonfinite_flag(self.params)
        return self._weights_bad
