"""What a model converter is, and the table the trainer finds converters in.

A converter changes a built, plain model in place (LoRA adapters through PEFT, float8 linears through
torchao) before activation checkpointing, ``torch.compile`` and FSDP2. It is one file: its config
section (a dataclass, one YAML group), a :class:`ModelConverter` subclass that checks that section and
converts the model, and ``@register_converter("<section>")``. Besides :meth:`~ModelConverter.convert`, a
converter may change, through hooks whose defaults change nothing:

- the FLOPs counted per token (:meth:`~ModelConverter.flops_per_token`; frozen weights get no weight gradient);
- the memory check made before anything is built (:meth:`~ModelConverter.training_bytes`: frozen or quantized
  weights need less than full training's) and where the pretrained model is loaded
  (:meth:`~ModelConverter.load_device`: QLoRA loads it on the CPU and quantizes it one linear at a time);
- what a checkpoint holds: only the trainable tensors (:attr:`~ModelConverter.saves_only_trainable`) and a
  record under its section's name that a resume checks (:meth:`~ModelConverter.check_record`), also in runs
  that do not use the converter;
- the final model that the export writes and that samples under torchrun (:meth:`~ModelConverter.final_model`),
  and files written beside it (:meth:`~ModelConverter.export_extra`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.registry import Registry


class ModelConverter:
    """The interface a converter implements: the class methods that read its config section, :meth:`convert`,
    and whichever hooks it needs."""

    # The config section that turns it on and holds its settings (set by register_converter).
    section: str = ""
    # Converters are applied in increasing order (adapters wrap the base linears before float8 converts them).
    order: int = 0
    # One line: what this converter did to the model (printed before training).
    description: str = ""
    # The converter writes checkpoint_record() into each checkpoint, under its section's name.
    writes_record: bool = False
    # Checkpoints hold only the trainable parameters; the frozen ones are built again on resume (from
    # model.pretrained_path), so they are not saved.
    saves_only_trainable: bool = False
    # final_model() builds the model the export writes, instead of the trained model itself.
    builds_final_model: bool = False

    # ---- its config section ---------------------------------------------------------------------------

    @classmethod
    def enabled(cls, section: Any) -> bool:
        """Whether the section asks for this converter."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Refuse, in one line, a bad value of the section (``cfg``: the whole recipe config, for settings the
        converter depends on elsewhere, such as ``model.pretrained_path``). Runs before any work starts."""

    @classmethod
    def from_config(
        cls, cfg: Any, *, autocast_dtype: torch.dtype | None, pretrained_dir: Path | None
    ) -> ModelConverter:
        """The converter of an enabled section. ``autocast_dtype``: the dtype the run's matmuls autocast to
        (None: no autocast); ``pretrained_dir``: the local directory of ``model.pretrained_path`` (None: a model
        built from a preset)."""
        raise NotImplementedError

    @classmethod
    def training_bytes(cls, cfg: Any, config: Any, *, autocast_dtype: torch.dtype | None) -> int | None:
        """A floor under the device memory that the weights, gradients and optimizer state of the model ``config``
        (a family's config) take once converted, in a run that autocasts to ``autocast_dtype``, for the memory check
        before anything is built (None: the plain model's, 16 bytes per parameter)."""
        return None

    # ---- what it does --------------------------------------------------------------------------------

    def load_device(self, device: torch.device) -> torch.device:
        """Where the trainer loads ``model.pretrained_path`` for a run on ``device``, before :meth:`convert`. A
        converter that answers another device moves the model to ``device`` in :meth:`convert`."""
        return device

    def convert(self, model: nn.Module, family: Any) -> None:
        """Change ``model`` in place (a family's :class:`~nemo_lite.components.models.CausalLM`)."""
        raise NotImplementedError

    def flops_per_token(self, model: nn.Module, flops: int) -> int:
        """The training FLOPs per token of the converted ``model``, given the family's count ``flops``."""
        return flops

    def checkpoint_record(self) -> dict[str, Any] | None:
        """What each checkpoint stores under the section's name, for :meth:`check_record` on resume."""
        return None

    @staticmethod
    def check_record(path: Path, saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None) -> None:
        """Refuse, in one line, resuming ``path`` whose record is ``saved`` in a run whose record is ``current``
        (None: that side does not have this converter). Static: a run without the converter checks too."""

    def final_model(self, model: nn.Module, *, device: torch.device, dist: Any, attention: Any) -> nn.Module | None:
        """With :attr:`builds_final_model`: the trained ``model`` as a plain module of its family, for the export
        (every rank calls it; rank 0 gets the model, on ``device`` under torchrun, where it also samples, the
        others None). ``attention``: the attention spec (an ``AttentionConfig``) the family builds it with."""
        raise NotImplementedError

    def export_extra(self, run_dir: Path, hf_dir: Path) -> str | None:
        """Write what this converter exports beside ``hf_dir`` (``run_dir/hf``, just written, whose tokenizer files
        carry the run's chat template), after :meth:`final_model`, on rank 0; returns the line to log (None:
        nothing written)."""
        return None


CONVERTERS: Registry[type[ModelConverter]] = Registry("converter section", attribute="section")


def register_converter(section: str):
    """Class decorator: the converter that the config section ``section`` turns on."""
    return CONVERTERS.register(section)


def unregister_converter(section: str) -> None:
    """Remove a converter (for tests that register temporary ones)."""
    CONVERTERS.unregister(section)


def registered_converters() -> list[type[ModelConverter]]:
    """Every registered converter class, in the order they are applied."""
    return sorted(CONVERTERS, key=lambda cls: cls.order)
