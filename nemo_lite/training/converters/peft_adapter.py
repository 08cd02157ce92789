"""Training on from an existing PEFT LoRA adapter (``peft.adapter_path``), and how an exported adapter names its base.

    adapter = read_adapter("runs/old/adapter")  # or a hub id, "org/name[@revision]", through the Hugging Face cache
    section = section_of(adapter, cfg.peft)     # the adapter's settings are the run's; a peft.* that differs: refused
    # LoraConverter.convert injects PEFT's layers with ``section``, then:
    load_into(model, adapter, base=cfg.model.pretrained_path)

The adapter's tensors reach nemo_lite's parameters through the export's key map run backwards: every adapter
parameter of the converted model has one PEFT key (:func:`~nemo_lite.training.converters.lora.hf_adapter_key`,
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``), and the adapter file must hold exactly those
keys with the same shapes. Anything else means another base, and is refused in one line naming the difference.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.errors import ConfigError
from nemo_lite.training.converters.peft_keys import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    ALL_LINEAR,
    PeftSection,
    block_linears,
    block_stacked_weights,
    hf_adapter_key,
)

# adapter_config.json keys whose non-neutral values change what the adapter computes in ways nemo_lite's LoRA does
# not train (per-module ranks, trained biases, extra trained modules, adapters on some layers only, ...).
UNSUPPORTED_KEYS = (
    "bias",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "fan_in_fan_out",
    "lora_bias",
    "trainable_token_indices",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
)
# peft.* key -> its adapter_config.json name
CONFIG_NAMES = {
    "r": "r",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "target_modules",
    "target_parameters": "target_parameters",
    "use_rslora": "use_rslora",
    "use_dora": "use_dora",
}


@dataclass
class PeftAdapter:
    """A PEFT adapter as found on disk: ``source`` as the user gave it, its local directory, its
    adapter_config.json and (once :func:`read_adapter` loaded them) its tensors under PEFT's key names."""

    source: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    key: str = "peft.adapter_path"  # the setting that named it, for messages (recipes/generate.py: adapter)

    def trained_on(self) -> str:
        base = self.config.get("base_model_name_or_path")
        return f"its adapter_config.json names the base {base}" if base else "its adapter_config.json names no base"


def resolve_adapter(source: str, *, key: str = "peft.adapter_path") -> Path:
    """The local directory of the adapter ``source``: a directory with adapter_config.json, or a hub id
    (``org/name[@revision]``) whose adapter_config.json and adapter_model.safetensors come from the Hugging Face cache
    (fetched first where the hub can be reached; ``HF_HUB_OFFLINE=1``: the cache only)."""
    from nemo_lite.components.models.hub import PretrainedNotFoundError, fetch_snapshot, split_hub_id

    local = Path(source).expanduser()
    if (local / ADAPTER_CONFIG).is_file():
        return local.resolve()
    try:
        hub_id = None if local.exists() else split_hub_id(source)
    except PretrainedNotFoundError as err:
        raise ConfigError(f"{key}={source}: {err}") from None
    if hub_id is None:
        raise ConfigError(
            f"{key}={source!r} is not a PEFT adapter directory (no {ADAPTER_CONFIG}) and not a hub id "
            "(org/name or org/name@revision): give the directory PeftModel.save_pretrained wrote (such as "
            "run_dir/adapter), or a hub id"
        )
    try:
        snapshot = fetch_snapshot(*hub_id, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    except PretrainedNotFoundError as err:
        raise ConfigError(f"{key}={source}: {err}") from None
    if not (snapshot / ADAPTER_CONFIG).is_file():
        raise ConfigError(f"{key}={source} has no {ADAPTER_CONFIG}: it is not a PEFT adapter")
    return snapshot


def read_adapter(source: str, *, with_tensors: bool = True, key: str = "peft.adapter_path") -> PeftAdapter:
    """The adapter ``source`` names (:func:`resolve_adapter`): its config, checked to be one this LoRA trains, and
    its tensors (safetensors only)."""
    path = resolve_adapter(str(source), key=key)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        why = "" if isinstance(config, dict) and {"r", "lora_alpha"} <= set(config) else "it lacks r or lora_alpha"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        config, why = {}, str(err).splitlines()[0]
    if why:
        raise ConfigError(
            f"{key}={source}: {ADAPTER_CONFIG} is not a LoRA config, a JSON object with r and lora_alpha "
            f"({why}): give the directory PeftModel.save_pretrained wrote"
        )
    adapter = PeftAdapter(str(source), path, config, key=key)
    check_supported(adapter)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(
            f"{key}={source} has no {ADAPTER_WEIGHTS} (only safetensors are read, never a pickle "
            "adapter_model.bin): save the adapter with safe_serialization (PEFT's default)"
        )
    if with_tensors:
        from nemo_lite.components.models.hf import _safetensors  # a damaged file: one line naming it

        with _safetensors(path / ADAPTER_WEIGHTS) as f:
            adapter.tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is no dict
    return adapter


def check_supported(adapter: PeftAdapter) -> None:
    """Refuse, in one line, an adapter whose config asks for what nemo_lite's LoRA does not train."""
    config = adapter.config
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise ConfigError(
            f"{adapter.key}={adapter.source} is a {kind} adapter; only LoRA adapters (peft_type LORA) train here"
        )
    for key in UNSUPPORTED_KEYS:
        value = config.get(key)
        if not (value is None or value is False or value in ([], {}, "none")):
            raise ConfigError(
                f"{adapter.key}={adapter.source} sets {key}={value!r}, which nemo_lite's LoRA does not train "
                "(it takes r, lora_alpha, lora_dropout, target_modules, target_parameters, use_rslora and use_dora): "
                "train this adapter with PEFT itself, or start a new one"
            )


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def adapter_settings(adapter: PeftAdapter) -> dict[str, Any]:
    """The adapter's settings as ``peft.*`` values (target names as leaf names, sorted)."""
    config = adapter.config
    parameters = sorted({_leaf(name) for name in config.get("target_parameters") or []})
    targets = config.get("target_modules")
    if isinstance(targets, list):
        modules = [ALL_LINEAR] if ALL_LINEAR in targets else sorted({_leaf(name) for name in targets})
    elif targets == ALL_LINEAR:
        modules = [ALL_LINEAR]
    else:  # a regular expression (or none): the modules its tensors adapt
        stacked = tuple(name.rsplit(".", 1)[0] for name in config.get("target_parameters") or [])
        modules = set()
        for key in adapter.tensors:
            module = key.split(".lora_", 1)[0]
            while module.endswith(".base_layer"):
                module = module.removesuffix(".base_layer")
            if not stacked or not module.endswith(stacked):
                modules.add(_leaf(module))
        modules = sorted(modules)
    return {
        "r": int(config["r"]),
        "alpha": float(config["lora_alpha"]),
        "dropout": float(config.get("lora_dropout") or 0.0),
        "target_modules": modules,
        "target_parameters": parameters,
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": bool(config.get("use_dora", False)),
    }


def _same(key: str, ours: Any, theirs: Any) -> bool:
    if key in ("target_modules", "target_parameters"):
        return sorted(ours) == sorted(theirs)
    return ours == theirs


def section_of(adapter: PeftAdapter, section: PeftSection) -> PeftSection:
    """``section`` with the adapter's settings. A ``peft.*`` value other than its default that differs from the
    adapter's is refused in one line: the adapter's settings are what the run trains."""
    settings = adapter_settings(adapter)
    default = PeftSection(method="lora")
    for key, theirs in settings.items():
        ours = getattr(section, key)
        if not _same(key, ours, getattr(default, key)) and not _same(key, ours, theirs):
            shown = list(ours) if isinstance(ours, list | tuple) else ours
            raise ConfigError(
                f"peft.{key}={shown} disagrees with the adapter {adapter.source}, whose {CONFIG_NAMES[key]} is "
                f"{theirs}: the adapter's settings are the run's; leave peft.{key} out or set it to {theirs}"
            )
    return dataclasses.replace(section, method="lora", **settings)


def check_adapter_config(cfg: Any) -> None:
    """What can be checked before any work (``LoraConverter.check_config``): a local adapter's config against
    ``cfg.peft``, and that a fresh run does not start from an output of the run_dir that it would move aside."""
    from nemo_lite.components.models.hub import PretrainedNotFoundError, split_hub_id
    from nemo_lite.training import checkpoint as ckpt
    from nemo_lite.training.run_dir import RUN_OUTPUTS

    source = str(cfg.peft.adapter_path)
    local = Path(source).expanduser()
    if not (local / ADAPTER_CONFIG).is_file():
        try:
            hub_id = None if local.exists() else split_hub_id(source)
        except PretrainedNotFoundError:
            hub_id = None
        if hub_id is None:
            resolve_adapter(source)  # refuses it, in its words
        return  # a hub id: resolved (perhaps downloaded) when the converter is built
    section_of(read_adapter(source, with_tensors=False), cfg.peft)
    if ckpt.resumes(cfg.trainer.resume):
        return
    run_dir, real = Path(cfg.run_dir).expanduser(), Path(os.path.realpath(local))
    for name in RUN_OUTPUTS:
        output = Path(os.path.realpath(run_dir / name))
        if os.path.lexists(run_dir / name) and (real == output or output in real.parents):
            raise ConfigError(
                f"peft.adapter_path {real} is the earlier run's {name} in run_dir {run_dir}, which a fresh run "
                "moves aside first (into replaced-<time>): start from it in another run_dir"
            )


def check_base(adapter: PeftAdapter, model: nn.Module, family: Any, *, section: PeftSection, base: Any) -> None:
    """Refuse, in one line, a base that lacks a module or stacked weight the adapter adapts."""
    linears = sorted(set(block_linears(model, family).values()))
    stacked = sorted(set(block_stacked_weights(model, family).values()))
    targets = [] if ALL_LINEAR in section.target_modules else list(section.target_modules)
    missing = [name for name in targets if name not in linears]
    missing += [name for name in section.target_parameters if name not in stacked]
    if missing:
        raise ConfigError(
            f"{adapter.key}={adapter.source} adapts {missing}, which the base model.pretrained_path={base} does "
            f"not have (its decoder linears: {', '.join(linears)}): {adapter.trained_on()}; train on that base"
        )


def load_into(model: nn.Module, adapter: PeftAdapter, *, base: Any) -> None:
    """Copy the adapter's tensors into the PEFT layers just injected into ``model`` (its trainable parameters),
    refusing in one line a file that holds other tensors or other shapes than this base's adapters."""
    params = {hf_adapter_key(name): p for name, p in model.named_parameters() if p.requires_grad}
    got = adapter.tensors
    other_base = f"{adapter.trained_on()} and model.pretrained_path is {base}"
    unexpected = sorted(set(got) - set(params))
    if unexpected:
        raise ConfigError(
            f"{adapter.key}={adapter.source} holds {len(unexpected)} tensor(s) this base has no place for, such "
            f"as {unexpected[0]}: it was trained on another base ({other_base})"
        )
    missing = sorted(set(params) - set(got))
    if missing:
        raise ConfigError(
            f"{adapter.key}={adapter.source} lacks {len(missing)} tensor(s) that its settings put on this base, "
            f"such as {missing[0]}: it was trained on another base ({other_base}), or adapts some layers only, "
            "which is not supported"
        )
    wrong = [key for key, p in params.items() if tuple(got[key].shape) != tuple(p.shape)]
    if wrong:
        key = wrong[0]
        raise ConfigError(
            f"{adapter.key}={adapter.source}: {key} is {list(got[key].shape)} in the adapter and "
            f"{list(params[key].shape)} on this base ({len(wrong)} tensor(s) differ): it was trained on another base "
            f"({other_base})"
        )
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(got[key].to(device=p.device, dtype=p.dtype))


def base_reference(base_path: Any) -> tuple[str, str | None]:
    """What an exported adapter's ``base_model_name_or_path`` (and ``revision``) says for ``model.pretrained_path``:
    a local directory as an absolute path ("~" expanded, links resolved), a hub id as itself and its revision, so
    ``AutoPeftModelForCausalLM.from_pretrained(run_dir/adapter)`` finds the base from anywhere."""
    from nemo_lite.components.models.hub import split_hub_id

    text = str(base_path)
    local = Path(text).expanduser()
    if local.exists():
        return str(local.resolve()), None
    hub_id = split_hub_id(text)
    return hub_id if hub_id is not None else (str(local.resolve()), None)


__all__ = [
    "PeftAdapter",
    "adapter_settings",
    "base_reference",
    "check_adapter_config",
    "check_base",
    "load_into",
    "read_adapter",
    "resolve_adapter",
    "section_of",
]
