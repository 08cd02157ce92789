"""``trainer.step_impl`` -> the training step: ``plain`` (:class:`~nemo_lite.training.step.PlainStep`),
``fast`` (:class:`~nemo_lite.training.fast.step.FastStep`, refused with the reason where it cannot run; on a
CPU only its fused AdamW runs) or ``auto`` (fast on a GPU, plain elsewhere). The step says in one line
what it runs, and which fast parts are off and why."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nemo_lite.training.config import ConfigError, check_step_impl
from nemo_lite.training.optimizers import OptimSection
from nemo_lite.training.step import PlainStep, TrainStep


def build_step(
    model: nn.Module,
    optim: OptimSection,
    *,
    impl: str,
    blocks: Sequence[nn.Module] = (),
    device: torch.device,
    distributed: bool,
    autocast_bf16: bool,
    compile: bool,
    loss_chunk_size: int,
) -> TrainStep:
    """The step ``impl`` names; ``auto`` takes the fast one on a GPU (on a CPU its Triton parts cannot run, and
    the plain step's numerics are the reference there). ``blocks``: ``family.blocks(model)``."""
    check_step_impl(impl)
    plain = lambda: PlainStep(model, optim, blocks=blocks, compile=compile, loss_chunk_size=loss_chunk_size)
    if impl == "plain":
        return plain()
    from nemo_lite.training.fast.step import FastStep, fast_step_missing

    missing = fast_step_missing(device)
    if impl == "fast" and missing:
        raise ConfigError(f"trainer.step_impl=fast needs {missing}; use trainer.step_impl=auto or plain")
    if impl == "auto" and device.type != "cuda":
        step = plain()
        step.description += f" (auto: the fast step's kernels need a CUDA device; this run is on {device.type})"
        return step
    return FastStep(
        model,
        optim,
        blocks=blocks,
        device=device,
        distributed=distributed,
        autocast_bf16=autocast_bf16,
        compile=compile,
        loss_chunk_size=loss_chunk_size,
    )
