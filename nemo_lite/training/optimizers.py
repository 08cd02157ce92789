"""The optimizer table: ``optim.name`` -> an entry that builds the optimizer and checks its own settings.

A recipe picks an entry with ``optim=<name>`` (``configs/optim/<name>.yaml``); the shared settings (lr,
schedule, weight decay, AdamW's betas and eps) are :class:`OptimSection`'s fields, and an entry's own ones
travel in ``optim.options``, which the entry checks (an unknown key is refused with the valid ones).
Registering an optimizer is one entry::

    @register_optimizer("sgd")
    class SGDEntry(OptimizerEntry):
        option_defaults = {"momentum": 0.9}

        @classmethod
        def build(cls, model, optim, blocks):
            options = cls.options(optim)
            return torch.optim.SGD(param_groups(model, optim.weight_decay), lr=optim.lr, **options)

Every step strategy builds its optimizer here; the fast step replaces an entry by its fused AdamW only
where the entry says it is AdamW (``adamw_compatible``). docs/optimizers.md has the details.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nemo_lite.errors import ConfigError
from nemo_lite.registry import Registry


@dataclass
class OptimSection:
    # The optimizer table's entry (nemo_lite.training.optimizers): adamw | muon (configs/optim/).
    name: str = "adamw"
    # Peak learning rate (muon scales it per matrix so its update's RMS matches AdamW's; docs/optimizers.md).
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    # Decoupled weight decay of the matrices (norms, biases and other vectors are not decayed).
    weight_decay: float = 0.1
    # AdamW's (also muon's AdamW part: embeddings, norms, biases, the output head).
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # The entry's own settings, checked by it (muon: momentum, nesterov, ns_steps; adamw: none).
    options: dict[str, Any] = field(default_factory=dict)


class OptimizerEntry:
    """One row of the table. ``build`` makes the optimizer for a model whose decoder blocks are ``blocks``
    (``family.blocks(model)``); ``option_defaults`` are the keys ``optim.options`` may set."""

    name: str = ""
    # True: the optimizer is torch's AdamW on param_groups(model, weight_decay) with OptimSection's settings,
    # so the fast step may run its fused AdamW (and the parts that need it) instead.
    adamw_compatible: bool = False
    option_defaults: Mapping[str, Any] = {}
    # What the optimizer is, for the step's one description line.
    summary: str = ""

    @classmethod
    def build(cls, model: nn.Module, optim: OptimSection, blocks: Sequence[nn.Module]) -> torch.optim.Optimizer:
        raise NotImplementedError

    @classmethod
    def check_option(cls, key: str, value: Any) -> None:
        """Refuse a bad value of one of ``option_defaults``' keys (the key is known)."""

    @classmethod
    def options(cls, optim: OptimSection) -> dict[str, Any]:
        """``optim.options`` over the defaults, checked: an unknown key or a bad value raises in one line."""
        given = dict(optim.options or {})
        unknown = sorted(set(given) - set(cls.option_defaults))
        if unknown:
            valid = ", ".join(sorted(cls.option_defaults)) or "none"
            raise ConfigError(f"optim.options.{unknown[0]} is not an option of optim={cls.name}; its options: {valid}")
        for key, value in given.items():
            cls.check_option(key, value)
        return {**cls.option_defaults, **given}


OPTIMIZERS: Registry[type[OptimizerEntry]] = Registry("optimizer", attribute="name")


def register_optimizer(name: str):
    """Class decorator: make the entry selectable as ``optim.name=<name>`` (``optim=<name>`` with a YAML)."""
    return OPTIMIZERS.register(name)


def unregister_optimizer(name: str) -> None:
    """Remove an entry (for tests that register temporary ones)."""
    OPTIMIZERS.unregister(name)


def list_optimizers() -> list[str]:
    return OPTIMIZERS.names()


def get_optimizer(name: str) -> type[OptimizerEntry]:
    """The entry ``name``; an unknown name raises with the registered ones."""
    entry = OPTIMIZERS.get(name)
    if entry is None:
        raise ConfigError(f"optim.name={name!r} is not valid; choose one of: {', '.join(list_optimizers())}")
    return entry


def check_optim(optim: OptimSection) -> type[OptimizerEntry]:
    """The entry ``optim.name`` names, with ``optim.options`` checked by it (before any work starts)."""
    entry = get_optimizer(optim.name)
    entry.options(optim)
    return entry


def build_optimizer(model: nn.Module, optim: OptimSection, blocks: Sequence[nn.Module]) -> torch.optim.Optimizer:
    """The optimizer ``optim.name`` names, over ``model``'s trainable parameters."""
    entry = check_optim(optim)
    return entry.build(model, optim, blocks)


# ---- AdamW ----------------------------------------------------------------------------------------------


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


def param_groups(model: nn.Module, weight_decay: float, *, exclude: Sequence[torch.Tensor] = ()) -> list[dict]:
    """Weight decay on matrices only; norms, biases and other vectors are not decayed. The trainable
    parameters, less ``exclude`` (those another optimizer updates)."""
    excluded = {id(p) for p in exclude}
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in excluded:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kwargs(optim: OptimSection) -> dict[str, Any]:
    return {"lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps}


@register_optimizer("adamw")
class AdamWEntry(OptimizerEntry):
    """torch's AdamW on every trainable parameter (decay on matrices only)."""

    adamw_compatible = True
    summary = "torch AdamW"

    @classmethod
    def build(cls, model, optim, blocks):
        cls.options(optim)
        return AdamW(param_groups(model, optim.weight_decay), **adamw_kwargs(optim))


# ---- Muon -----------------------------------------------------------------------------------------------


def block_matrices(model: nn.Module, blocks: Sequence[nn.Module]) -> list[torch.Tensor]:
    """The trainable 2-D parameters of the decoder blocks, each once, in ``model.parameters()`` order."""
    inside = {id(p) for block in blocks for p in block.parameters() if p.requires_grad and p.dim() == 2}
    return [p for p in model.parameters() if id(p) in inside]  # parameters() yields each tensor once


@register_optimizer("muon")
class MuonEntry(OptimizerEntry):
    """torch's Muon on the decoder blocks' matrices, torch's AdamW on every other parameter (embeddings,
    norms, biases, the output head). Muon's step size is ``lr * 0.2 * sqrt(max(fan_out, fan_in))``, which
    matches its update's RMS to AdamW's, so ``optim.lr`` and ``optim.weight_decay`` serve both parts."""

    option_defaults = {"momentum": 0.95, "nesterov": True, "ns_steps": 5}
    summary = "Muon on the decoder blocks' matrices, AdamW on the rest"

    @classmethod
    def check_option(cls, key, value):
        if key == "momentum" and not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value < 1):
            raise ConfigError(f"optim.options.momentum={value!r} must be in [0, 1)")
        if key == "nesterov" and not isinstance(value, bool):
            raise ConfigError(f"optim.options.nesterov={value!r} must be true or false")
        if key == "ns_steps" and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 100):
            raise ConfigError(f"optim.options.ns_steps={value!r} must be an integer in [1, 99]")

    @classmethod
    def build(cls, model, optim, blocks):
        from nemo_lite.training.muon import MuonWithAdamW

        options = cls.options(optim)
        matrices = block_matrices(model, blocks)
        if not matrices:
            raise ConfigError("optim=muon found no trainable 2-D matrix in the model's decoder blocks; use optim=adamw")
        others = param_groups(model, optim.weight_decay, exclude=matrices)
        return MuonWithAdamW(
            matrices,
            others,
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            adamw_betas=(optim.beta1, optim.beta2),
            adamw_eps=optim.eps,
            **options,
        )
