"""One entry per model family: everything the trainer needs to know about a kind of model.

The trainer never reads a family's attribute names (``layers``, ``embed_tokens``, ...). It asks the
family's entry, and calls the few methods every causal LM here has (:class:`CausalLM`). Adding a
family is one module that builds a :class:`ModelFamily` and calls :func:`register_model_family`:

    family = get_model_family("llama")
    model = family.build(family.preset("tiny"), attention="sdpa")
    family.flops_per_token(model)                     # for MFU
    family.shard(model, mp_policy=..., reshard_after_forward=True)   # FSDP2

Presets are looked up by exact name across families; a Hugging Face directory picks its family by
``model_type`` in config.json, which is what :class:`AutoModelForCausalLM` does:

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B", attention="flex")   # or a directory
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from nemo_lite.components.attention import AttentionMask
from nemo_lite.components.models.hub import PretrainedNotFoundError, resolve_pretrained
from nemo_lite.errors import NemoLiteError


class CausalLM(Protocol):
    """What the trainer calls on a model, whatever its family."""

    config: Any  # has vocab_size and eos_token_id
    tokenizer_dir: Path | None  # the tokenizer that goes with the weights (set by loading a checkpoint)

    def build_attention_mask(self, input_ids_BS: torch.Tensor, eos_id: int | None = None) -> AttentionMask: ...

    def forward_hidden(
        self,
        input_ids_BS: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: AttentionMask | None = None,
    ) -> torch.Tensor: ...

    @property
    def output_weight(self) -> torch.Tensor: ...  # [vocab, hidden]: logits = hidden @ output_weight.T

    def init_weights(self, seed: int = 0) -> None: ...

    def save_pretrained(self, path: str | Path, *, tokenizer_dir: str | Path | None = None) -> Path: ...


class UnknownPresetError(NemoLiteError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class UnknownModelTypeError(NemoLiteError, ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """A model family's entry (compare torchtitan's TrainSpec)."""

    # The family's name ("llama").
    name: str
    # The model class: ``model_cls(config, *, attention, attn_mask_type, fixed_block_size, attention_options)``.
    model_cls: type[nn.Module]
    # The config dataclass; its fields are what ``model.overrides`` may set.
    config_cls: type
    # Named configs, looked up by exact name (a copy is returned).
    presets: Mapping[str, Any]
    # config.json ``model_type`` values this family loads.
    hf_model_types: tuple[str, ...]
    # ``(path, *, attention, attn_mask_type, fixed_block_size, attention_options, dtype, device) -> model``:
    # a Hugging Face directory (config.json + safetensors).
    load_pretrained: Callable[..., nn.Module]
    # The repeated blocks: units of activation checkpointing and of FSDP2 sharding.
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    # Modules compiled one by one with trainer.compile (the blocks, and what else runs eagerly otherwise).
    compile_units: Callable[[nn.Module], Sequence[nn.Module]]
    # FSDP2: ``shard(model, *, mp_policy, reshard_after_forward, mesh=None)`` applies fully_shard to the model.
    shard: Callable[..., None]
    # Matmul FLOPs per token, forward + backward (6 x the parameters that multiply each token).
    flops_per_token: Callable[[nn.Module], int]
    # Attention FLOPs per allowed (query, key) pair, forward + backward, summed over layers and heads.
    attention_flops_per_pair: Callable[[Any], int]

    def preset(self, name: str, **overrides: Any) -> Any:
        """A fresh copy of the preset called exactly ``name``, with ``overrides`` replacing fields."""
        if name not in self.presets:
            raise UnknownPresetError(f"unknown model preset {name!r}; valid presets: {', '.join(list_presets())}")
        unknown = sorted(set(overrides) - set(self.config_fields()))
        if unknown:
            raise ValueError(f"unknown {self.name} config field(s) {unknown}; valid: {', '.join(self.config_fields())}")
        base = self.presets[name]
        # head_dim the preset derived from its shape is derived again from the new one; a head_dim the
        # preset chose apart from its shape (Qwen3) stays, unless overridden too.
        reshaped = {"hidden_size", "num_attention_heads"} & set(overrides) and "head_dim" not in overrides
        if reshaped and getattr(base, "head_dim", None) == base.hidden_size // base.num_attention_heads:
            overrides["head_dim"] = None
        return copy_config(base, **overrides)

    def config_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def build(
        self,
        config: Any,
        *,
        attention: str = "sdpa",
        attn_mask_type: str = "causal",
        fixed_block_size: int | None = None,
        attention_options: Mapping[str, Any] | None = None,
    ) -> nn.Module:
        return self.model_cls(
            config,
            attention=attention,
            attn_mask_type=attn_mask_type,
            fixed_block_size=fixed_block_size,
            attention_options=attention_options,
        )


def copy_config(config: Any, **overrides: Any) -> Any:
    """A deep copy of a config dataclass (nested dataclasses are not shared), with fields replaced."""
    fresh = {
        f.name: dataclasses.replace(value)
        for f in dataclasses.fields(config)
        if dataclasses.is_dataclass(value := getattr(config, f.name)) and f.name not in overrides
    }
    return dataclasses.replace(config, **fresh, **overrides)


_FAMILIES: dict[str, ModelFamily] = {}


def register_model_family(family: ModelFamily) -> ModelFamily:
    """Make a family's presets and Hugging Face model types available to recipes."""
    existing = _FAMILIES.get(family.name)
    if existing is not None and existing is not family:
        raise ValueError(f"model family {family.name!r} is already registered")
    for other in _FAMILIES.values():
        if other is family:
            continue
        if clash := sorted(set(other.presets) & set(family.presets)):
            raise ValueError(f"preset(s) {clash} of family {family.name!r} already belong to {other.name!r}")
        if clash := sorted(set(other.hf_model_types) & set(family.hf_model_types)):
            raise ValueError(f"model_type(s) {clash} of family {family.name!r} already belong to {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def get_model_family(name: str) -> ModelFamily:
    if name not in _FAMILIES:
        raise KeyError(f"unknown model family {name!r}; registered: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def list_presets() -> list[str]:
    return sorted(name for family in _FAMILIES.values() for name in family.presets)


def get_preset(name: str, **overrides: Any) -> Any:
    """A fresh copy of the preset called exactly ``name`` (any family), with ``overrides`` replacing fields."""
    return family_of_preset(name).preset(name, **overrides)


def family_of_preset(name: str) -> ModelFamily:
    for family in _FAMILIES.values():
        if name in family.presets:
            return family
    raise UnknownPresetError(f"unknown model preset {name!r}; valid presets: {', '.join(list_presets())}")


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family whose model class ``model`` is (or, failing that, derives from most closely)."""
    for cls in type(model).__mro__:
        for family in _FAMILIES.values():
            if family.model_cls is cls:
                return family
    raise TypeError(f"{type(model).__qualname__} belongs to no registered model family")


def family_of_checkpoint(path: str | Path) -> ModelFamily:
    """The family of a Hugging Face directory, by ``model_type`` in its config.json."""
    config_path = Path(path).expanduser() / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise UnknownModelTypeError(f"{config_path} is not a readable JSON object: {err}") from None
    for family in _FAMILIES.values():
        if model_type in family.hf_model_types:
            return family
    supported = sorted(t for f in _FAMILIES.values() for t in f.hf_model_types)
    raise UnknownModelTypeError(
        f"{config_path}: model_type={model_type!r} is not supported; supported: {', '.join(supported)} "
        "(another architecture needs its own registered ModelFamily)"
    )


class AutoModelForCausalLM:
    """Loads any registered family's checkpoint, the family chosen by ``model_type`` in its config.json."""

    @staticmethod
    def from_pretrained(
        path_or_hub_id: str | Path,
        *,
        revision: str | None = None,
        attention: str = "sdpa",
        attn_mask_type: str = "causal",
        fixed_block_size: int | None = None,
        attention_options: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> nn.Module:
        """A local directory (config.json + safetensors) or a hub id (``org/name``, ``org/name@revision``
        or ``revision=``) resolved through the Hugging Face cache (:func:`resolve_pretrained`)."""
        path = resolve_pretrained(path_or_hub_id, revision=revision)
        return family_of_checkpoint(path).load_pretrained(
            path,
            attention=attention,
            attn_mask_type=attn_mask_type,
            fixed_block_size=fixed_block_size,
            attention_options=attention_options,
            dtype=dtype,
            device=device,
        )


__all__ = [
    "AutoModelForCausalLM",
    "CausalLM",
    "PretrainedNotFoundError",
    "ModelFamily",
    "UnknownModelTypeError",
    "UnknownPresetError",
    "copy_config",
    "family_of_checkpoint",
    "family_of_model",
    "family_of_preset",
    "get_model_family",
    "get_preset",
    "list_presets",
    "register_model_family",
    "resolve_pretrained",
]
