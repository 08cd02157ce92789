"""One entry per model family: everything the trainer needs to know about a kind of model.

The trainer never reads a family's attribute names (``layers``, ``embed_tokens``, ...). It asks the
family's entry, and calls the few methods every causal LM here has (:class:`CausalLM`). Adding a
family is one module in ``families/`` that builds a :class:`ModelFamily` (its Hugging Face facts in
:class:`HFFacts`) and calls :func:`register_model_family`; the ``families`` package imports every module
it holds, so nothing else names the family:

    family = get_model_family("llama")
    model = family.build(family.preset("tiny"), attention=AttentionConfig(backend="sdpa"))
    family.num_parameters(config)                     # without building the model
    family.flops_per_token(model)                     # for MFU, with family.attention_flops(config, mask)
    family.shard(model, mp_policy=..., reshard_after_forward=True)   # FSDP2

Presets are looked up by exact name across families; a Hugging Face directory picks its family by
``model_type`` in config.json, which is what :class:`AutoModelForCausalLM` does:

    model = AutoModelForCausalLM.from_pretrained("org/name", attention=AttentionConfig(backend="flex"))  # or a dir
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

from nemo_lite.components.attention import AttentionBackend, AttentionConfig, AttentionMask
from nemo_lite.components.models.hub import PretrainedNotFoundError, resolve_pretrained
from nemo_lite.errors import NemoLiteError


class CausalLM(Protocol):
    """What the trainer calls on a model, whatever its family. Optional: ``auxiliary()``, read after each
    forward, returns what the model adds to the training loss and the metrics to log (a mixture of experts'
    load-balancing loss: ``moe.Auxiliary``), or None."""

    config: Any  # has vocab_size and eos_token_id
    tokenizer_dir: Path | None  # the tokenizer that goes with the weights (set by loading a checkpoint)
    attention_backend: AttentionBackend  # built once from the model's AttentionConfig, shared by its layers

    def build_attention_mask(
        self, input_ids_BS: torch.Tensor, eos_id: int | None = None, position_ids: torch.Tensor | None = None
    ) -> AttentionMask: ...

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

    def save_pretrained(self, path: str | Path, *, tokenizer_dir: str | Path | None = None, **export: Any) -> Path: ...


class UnknownPresetError(NemoLiteError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class UnknownModelTypeError(NemoLiteError, ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class HFFacts:
    """What a family's Hugging Face checkpoints say about it, read by :mod:`~nemo_lite.components.models.hf`."""

    # config.json ``model_type`` values this family loads; the first is the one written.
    model_types: tuple[str, ...]
    # The ``architectures`` entry written to config.json: the transformers class that loads it.
    architecture: str
    # transformers' value of each optional config.json key this family's config class reads (its config
    # class's defaults), so that both libraries read a file that lacks the key the same way.
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # Keys written to config.json for transformers' sake (nothing here reads them).
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # ``check(config_json_dict)``: refuses (raises ``CheckpointError``) what this family cannot load although
    # its config class would read it; None = nothing of its own.
    check: Callable[[dict[str, Any]], None] | None = None
    # Parameter names that differ from the shared decoder's map (``hf.HF_KEY_MAP``): ours -> Hugging Face's,
    # ``{i}`` the layer index.
    key_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # Parameters stored stacked over experts here and one tensor per expert in the checkpoint: ours (``{i}`` the
    # layer) -> the Hugging Face names of one expert's parts (``{i}``, ``{e}`` the expert), which are
    # concatenated along dim 0 to give row ``e`` of ours (``gate_up_proj`` <- ``gate_proj``, ``up_proj``).
    expert_keys: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # config.json keys read as one of our fields (``num_local_experts`` -> ``num_experts``).
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """A model family's entry (compare torchtitan's TrainSpec)."""

    # The family's name ("llama").
    name: str
    # The model class: ``model_cls(config, *, attention: AttentionConfig | None)``.
    model_cls: type[nn.Module]
    # The config dataclass; its fields are what ``model.overrides`` may set.
    config_cls: type
    # Named configs, looked up by exact name (a copy is returned).
    presets: Mapping[str, Any]
    # Its Hugging Face checkpoints: model_type(s), architecture, config.json defaults and extras, key map.
    hf: HFFacts
    # ``(path, *, attention, dtype, device) -> model``: a Hugging Face directory (config.json + safetensors).
    load_pretrained: Callable[..., nn.Module]
    # The repeated blocks: units of activation checkpointing and of FSDP2 sharding.
    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    # Modules compiled one by one with trainer.compile (the blocks, and what else runs eagerly otherwise).
    compile_units: Callable[[nn.Module], Sequence[nn.Module]]
    # FSDP2: ``shard(model, *, mp_policy, reshard_after_forward, mesh=None)`` applies fully_shard to the model.
    shard: Callable[..., None]
    # ``num_parameters(config)``: the parameters of the model ``config`` describes, without building it.
    num_parameters: Callable[[Any], int]
    # Matmul FLOPs per token, forward + backward (6 x the parameters that multiply each token).
    flops_per_token: Callable[[nn.Module], int]
    # ``attention_flops(config, mask)``: forward + backward attention FLOPs of a step's mask, summed over layers
    # and heads, each layer counting the pairs its own window allows (a device scalar: no host sync).
    attention_flops: Callable[[Any, AttentionMask], torch.Tensor]

    def preset(self, name: str, **overrides: Any) -> Any:
        """A fresh copy of the preset called exactly ``name``, with ``overrides`` replacing fields."""
        if name not in self.presets:
            raise UnknownPresetError(f"unknown model preset {name!r}; valid presets: {', '.join(list_presets())}")
        unknown = sorted(set(overrides) - set(self.config_fields()))
        if unknown:
            raise ValueError(f"unknown {self.name} config field(s) {unknown}; valid: {', '.join(self.config_fields())}")
        base = self.presets[name]
        # head_dim the preset derived from its shape is derived again from the new one; a head_dim the
        # preset chose apart from its shape stays, unless overridden too.
        reshaped = {"hidden_size", "num_attention_heads"} & set(overrides) and "head_dim" not in overrides
        if reshaped and getattr(base, "head_dim", None) == base.hidden_size // base.num_attention_heads:
            overrides["head_dim"] = None
        return copy_config(base, **overrides)

    def config_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config_cls)]

    def build(self, config: Any, *, attention: AttentionConfig | None = None) -> nn.Module:
        """The family's model of ``config``, attending as ``attention`` says (None: sdpa, causal)."""
        return self.model_cls(config, attention=attention)


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
        if clash := sorted(set(other.hf.model_types) & set(family.hf.model_types)):
            raise ValueError(f"model_type(s) {clash} of family {family.name!r} already belong to {other.name!r}")
    _FAMILIES[family.name] = family
    return family


def unregister_model_family(name: str) -> None:
    """Remove a family (for tests that register temporary ones)."""
    _FAMILIES.pop(name, None)


def model_families() -> list[ModelFamily]:
    """Every registered family, in the order they were registered."""
    return list(_FAMILIES.values())


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


def family_of_config(config: Any) -> ModelFamily:
    """The family whose config class ``config`` is (exactly: a subclass may be another family's)."""
    for family in _FAMILIES.values():
        if type(config) is family.config_cls:
            return family
    raise TypeError(f"{type(config).__qualname__} is the config class of no registered model family")


def family_of_model_type(model_type: Any, where: str = "config.json") -> ModelFamily:
    """The family that loads ``model_type`` (a config.json's); an unknown one is refused in one line."""
    for family in _FAMILIES.values():
        if model_type in family.hf.model_types:
            return family
    supported = sorted(t for f in _FAMILIES.values() for t in f.hf.model_types)
    raise UnknownModelTypeError(
        f"{where}: model_type={model_type!r} is not supported; supported: {', '.join(supported)} "
        "(another architecture needs its own registered ModelFamily)"
    )


def family_of_checkpoint(path: str | Path) -> ModelFamily:
    """The family of a Hugging Face directory, by ``model_type`` in its config.json."""
    config_path = Path(path).expanduser() / "config.json"
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, AttributeError) as err:
        raise UnknownModelTypeError(f"{config_path} is not a readable JSON object: {err}") from None
    return family_of_model_type(model_type, str(config_path))


class AutoModelForCausalLM:
    """Loads any registered family's checkpoint, the family chosen by ``model_type`` in its config.json."""

    @staticmethod
    def from_pretrained(
        path_or_hub_id: str | Path,
        *,
        revision: str | None = None,
        attention: AttentionConfig | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> nn.Module:
        """A local directory (config.json + safetensors) or a hub id (``org/name``, ``org/name@revision``
        or ``revision=``) resolved through the Hugging Face cache (:func:`resolve_pretrained`). ``attention``:
        how it attends (None: sdpa, causal)."""
        path = resolve_pretrained(path_or_hub_id, revision=revision)
        return family_of_checkpoint(path).load_pretrained(path, attention=attention, dtype=dtype, device=device)


__all__ = [
    "AutoModelForCausalLM",
    "CausalLM",
    "HFFacts",
    "PretrainedNotFoundError",
    "ModelFamily",
    "UnknownModelTypeError",
    "UnknownPresetError",
    "copy_config",
    "family_of_checkpoint",
    "family_of_config",
    "family_of_model_type",
    "family_of_preset",
    "get_model_family",
    "get_preset",
    "list_presets",
    "model_families",
    "register_model_family",
    "resolve_pretrained",
    "unregister_model_family",
]
