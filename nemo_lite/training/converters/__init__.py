"""Model converters: changes applied to a built model that the model files never know about.

A converter swaps or wraps modules of a plain model in place (LoRA adapters through PEFT, float8 linears
through torchao). The trainer builds the model (weights loaded, on its device), applies the configured
converters in the order below, then activation checkpointing, ``torch.compile`` and FSDP2, then builds the
step. Adding one means a config section, a class with :meth:`ModelConverter.convert`, and one line in
:func:`build_converters`; the trainer does not change.

Order: ``peft`` (adapters wrap the base linears) before ``float8`` (which converts the base linears it is
allowed to; the adapters' own small matrices stay in high precision).
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn


class ModelConverter(Protocol):
    # One line: what this converter did to the model (printed before training).
    description: str

    def convert(self, model: nn.Module, family: Any) -> None:
        """Change ``model`` in place (a family's :class:`~nemo_lite.components.models.CausalLM`)."""


def build_converters(cfg: Any, *, autocast_dtype: Any = None) -> list[ModelConverter]:
    """The converters ``cfg`` (a :class:`~nemo_lite.training.config.RecipeConfig`) asks for, in the order they
    are applied. Each one checks its own section and refuses contradictory options in one line.
    ``autocast_dtype``: the dtype the run's matmuls autocast to (None: no autocast)."""
    converters: list[ModelConverter] = []
    if cfg.peft.method != "none":
        from nemo_lite.training.converters.lora import LoraConverter

        converters.append(LoraConverter(cfg.peft, frozen_dtype=autocast_dtype))
    if cfg.float8.enabled:
        from nemo_lite.training.converters.float8 import Float8Converter

        converters.append(Float8Converter(cfg.float8))
    return converters
