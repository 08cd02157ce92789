"""Model converters: changes applied to a built model that the model files never know about.

Each converter is one file of this package, found through the table in :mod:`.base` by the name of its
config section (``peft``: LoRA through PEFT; ``float8``: float8 linears through torchao). The trainer
builds the model (weights loaded, on its device), applies the enabled converters in their order, then
activation checkpointing, ``torch.compile`` and FSDP2, then builds the step; it calls the functions below
and never names a converter.

(The fast step's module swaps, applied after FSDP2, are another thing: ``training/fast``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_lite.training.converters import float8, lora  # noqa: F401  (registers the converters)
from nemo_lite.training.converters.base import (
    ModelConverter,
    register_converter,
    registered_converters,
    unregister_converter,
)


def check_converter_sections(cfg: Any) -> None:
    """Each registered converter checks its own section of ``cfg`` (a recipe config), in one line."""
    for cls in registered_converters():
        cls.check_config(cfg)


def build_converters(
    cfg: Any, *, autocast_dtype: torch.dtype | None = None, pretrained_dir: Path | None = None
) -> list[ModelConverter]:
    """The converters ``cfg`` turns on, in the order they are applied."""
    return [
        cls.from_config(cfg, autocast_dtype=autocast_dtype, pretrained_dir=pretrained_dir)
        for cls in registered_converters()
        if cls.enabled(getattr(cfg, cls.section))
    ]


def training_bytes(cfg: Any, config: Any, *, autocast_dtype: torch.dtype | None = None) -> int | None:
    """A floor under the training state's bytes of the model ``config`` as ``cfg``'s converters change it, in a run
    that autocasts to ``autocast_dtype`` (None: no converter changes it): the first enabled converter's answer."""
    for cls in registered_converters():
        if cls.enabled(getattr(cfg, cls.section)):
            found = cls.training_bytes(cfg, config, autocast_dtype=autocast_dtype)
            if found is not None:
                return found
    return None


def converter_records(converters: list[ModelConverter]) -> dict[str, Any]:
    """What a checkpoint's train state holds of this run's converters, by section."""
    return {c.section: c.checkpoint_record() for c in converters if c.writes_record}


def check_resume(converters: list[ModelConverter], path: Path, saved_state: Mapping[str, Any]) -> None:
    """Refuse, in one line, a checkpoint (its train state ``saved_state``) that does not fit this run's
    ``converters``: every registered kind that writes a record compares the checkpoint's with this run's,
    including the kinds this run does not have (a LoRA run's checkpoint holds no base weights to resume a run
    without it)."""
    current = converter_records(converters)
    for cls in registered_converters():
        if cls.writes_record:
            cls.check_record(path, saved_state.get(cls.section), current.get(cls.section))


__all__ = [
    "ModelConverter",
    "build_converters",
    "check_converter_sections",
    "check_resume",
    "converter_records",
    "register_converter",
    "registered_converters",
    "training_bytes",
    "unregister_converter",
]
