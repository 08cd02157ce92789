"""Model converters: changes applied to a built model that the model files never know about.

A converter swaps or wraps modules of a plain model in place (LoRA adapters through PEFT, float8 linears
through torchao). The trainer builds the model (weights loaded, on its device), applies the configured
converters in the order below, then activation checkpointing, ``torch.compile`` and FSDP2, then builds the
step. Besides :meth:`ModelConverter.convert`, a converter may change, through hooks whose defaults change
nothing:

- the FLOPs counted per token (:meth:`~ModelConverter.flops_per_token`; frozen weights get no weight gradient);
- what a checkpoint holds: only the trainable tensors (:attr:`~ModelConverter.saves_only_trainable`) and a
  record under :attr:`~ModelConverter.record_key` that a resume checks (:meth:`~ModelConverter.check_record`);
- the final model that the export writes and that samples under torchrun (:meth:`~ModelConverter.final_model`),
  and files written beside it (:meth:`~ModelConverter.export_extra`).

Adding one means a config section, a subclass of :class:`ModelConverter`, and one line in :func:`build_converters`
(and in :func:`check_resume` where it writes a record); the trainer does not change.

Order: ``peft`` (adapters wrap the base linears) before ``float8`` (which converts the base linears it is
allowed to; the adapters' own small matrices stay in high precision).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.training.distributed import DistInfo


class ModelConverter:
    """The interface a converter implements: :meth:`convert`, and whichever hooks it needs."""

    # One line: what this converter did to the model (printed before training).
    description: str = ""
    # The key of this converter's record in a checkpoint's train state (None: it writes none).
    record_key: str | None = None
    # Checkpoints hold only the trainable parameters; the frozen ones are built again on resume (from
    # model.pretrained_path), so they are not saved.
    saves_only_trainable: bool = False
    # final_model() builds the model the export writes, instead of the trained model itself.
    builds_final_model: bool = False

    def convert(self, model: nn.Module, family: Any) -> None:
        """Change ``model`` in place (a family's :class:`~nemo_lite.components.models.CausalLM`)."""
        raise NotImplementedError

    def flops_per_token(self, model: nn.Module, flops: int) -> int:
        """The training FLOPs per token of the converted ``model``, given the family's count ``flops``."""
        return flops

    def checkpoint_record(self) -> dict[str, Any] | None:
        """What each checkpoint stores under :attr:`record_key`, for :meth:`check_record` on resume."""
        return None

    @staticmethod
    def check_record(path: Path, saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> None:
        """Refuse, in one line, resuming ``path`` whose record is ``saved`` in a run whose record is ``current``
        (None: that side does not have this converter). Static: a run without the converter checks too."""

    def final_model(
        self, model: nn.Module, *, device: torch.device, dist: DistInfo, attention: AttentionConfig | None
    ) -> nn.Module | None:
        """With :attr:`builds_final_model`: the trained ``model`` as a plain module of its family, for the export
        (every rank calls it; rank 0 gets the model, on ``device`` under torchrun, where it also samples, the
        others None). ``attention``: the attention spec the family builds the model with."""
        raise NotImplementedError

    def export_extra(self, run_dir: Path) -> str | None:
        """Write what this converter exports beside ``run_dir/hf`` (after :meth:`final_model`, on rank 0);
        returns the line to log (None: nothing written)."""
        return None


def build_converters(
    cfg: Any, *, autocast_dtype: Any = None, pretrained_dir: Path | None = None
) -> list[ModelConverter]:
    """The converters ``cfg`` (a :class:`~nemo_lite.training.config.RecipeConfig`) asks for, in the order they
    are applied. Each one checks its own section and refuses contradictory options in one line.
    ``autocast_dtype``: the dtype the run's matmuls autocast to (None: no autocast); ``pretrained_dir``: the
    local directory of ``model.pretrained_path`` (None: a model built from a preset)."""
    converters: list[ModelConverter] = []
    if cfg.peft.method != "none":
        from nemo_lite.training.converters.lora import LoraConverter

        converters.append(
            LoraConverter(
                cfg.peft, frozen_dtype=autocast_dtype, base_dir=pretrained_dir, base_path=cfg.model.pretrained_path
            )
        )
    if cfg.float8.enabled:
        from nemo_lite.training.converters.float8 import Float8Converter

        converters.append(Float8Converter(cfg.float8))
    return converters


def check_resume(converters: list[ModelConverter], path: Path, saved_state: Mapping[str, Any]) -> None:
    """Refuse, in one line, a checkpoint (its train state ``saved_state``) that does not fit this run's
    ``converters``: each kind that writes a record compares the checkpoint's with this run's, including the
    kinds this run does not have (a LoRA run's checkpoint holds no base weights to resume a run without it)."""
    from nemo_lite.training.converters.lora import LoraConverter

    current = {c.record_key: c.checkpoint_record() for c in converters if c.record_key is not None}
    for kind in dict.fromkeys([LoraConverter, *map(type, converters)]):
        if kind.record_key is not None:
            kind.check_record(path, saved_state.get(kind.record_key), current.get(kind.record_key))
