"""The names PEFT gives nemo_lite's LoRA: the ``peft:`` config section, the adapted modules and stacked weights of a
model, and each adapter tensor's key in a PEFT adapter file. Shared by the LoRA converter (``lora.py``) and the
reader of existing PEFT adapters (``peft_adapter.py``)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

ADAPTER_NAME = "default"  # PEFT's adapter name inside the layers; not part of any exported key
ALL_LINEAR = "all-linear"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class PeftSection:
    """The ``peft:`` config section (configs/peft/*.yaml)."""

    # "none" (every weight trains) or "lora" (adapters through PEFT; configs/peft/lora.yaml, docs/finetuning.md).
    method: str = "none"
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    # Hugging Face module names (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) or all-linear.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Stacked expert weights of a mixture of experts (gate_up_proj, down_proj), adapted per expert through PEFT's
    # target_parameters; [] adapts none.
    target_parameters: list[str] = field(default_factory=list)
    # QLoRA: "nf4" stores the decoder blocks' frozen linears in 4-bit NF4 through torchao (converters/nf4.py);
    # "none" keeps them in the run's dtype.
    quantize_base: str = "none"
    # rsLoRA: the update is scaled by alpha / sqrt(r) instead of alpha / r.
    use_rslora: bool = False
    # DoRA: each adapted weight becomes a trained magnitude per output row times the direction of W + B A.
    use_dora: bool = False
    # A PEFT LoRA adapter to train on from: a local directory (adapter_config.json + adapter_model.safetensors) or a
    # hub id (org/name[@revision]). Its settings are the run's (docs/finetuning.md, "Bring your own adapter").
    adapter_path: str | None = None


def block_stacked_weights(model: nn.Module, family: Any) -> dict[str, str]:
    """Every parameter stacked over experts (``[E, ...]``, three dimensions) inside the family's decoder blocks:
    full parameter path -> leaf name (``gate_up_proj``)."""
    in_blocks = {id(p) for block in family.blocks(model) for p in block.parameters()}
    return {
        name: name.rsplit(".", 1)[-1]
        for name, param in model.named_parameters()
        if param.dim() == 3 and id(param) in in_blocks
    }


def block_linears(model: nn.Module, family: Any) -> dict[str, str]:
    """Every ``nn.Linear`` inside the family's decoder blocks: full module path -> leaf name (``q_proj``)."""
    in_blocks = {id(m) for block in family.blocks(model) for m in block.modules()}
    return {
        name: name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module) in in_blocks
    }


def hf_module_path(module: str) -> str:
    """``layers.0.attention.q_proj`` -> ``model.layers.0.self_attn.q_proj``: the Hugging Face path of one of our
    modules, through the parameter-name table (any parameter under it gives the module's prefix)."""
    from nemo_lite.components.models.hf import HF_KEY_MAP, to_hf_key

    template = re.sub(r"^layers\.\d+\.", "layers.{i}.", module) + "."
    for key in HF_KEY_MAP:
        if key.startswith(template) and "." not in key[len(template) :]:
            leaf = key[len(template) :]
            return to_hf_key(f"{module}.{leaf}").removesuffix(f".{leaf}")
    raise KeyError(f"module {module!r} has no parameter in HF_KEY_MAP")


def hf_parameter_target(path: str) -> str:
    """``layers.0.mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj``: how PEFT's ``target_parameters``
    names a stacked weight of a transformers model (the path inside a decoder layer, as PEFT matches suffixes)."""
    module, leaf = path.rsplit(".", 1)
    return re.sub(r"^model\.layers\.\d+\.", "", hf_module_path(module)) + f".{leaf}"


def hf_adapter_key(name: str) -> str:
    """``layers.0.attention.q_proj.lora_A.default.weight`` -> ``base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.weight``: the key PEFT writes for a transformers model (adapter name dropped). Adapters on stacked
    weights keep PEFT's nesting (``mlp.experts.base_layer.lora_A``: a second weight of one module wraps the
    first's wrapper). DoRA's magnitude (``...q_proj.lora_magnitude_vector.default.weight``) is
    ``...q_proj.lora_magnitude_vector``, as PEFT saves it."""
    module, rest = name.split(".lora_", 1)
    which, adapter, tensor = rest.split(".")
    if adapter != ADAPTER_NAME:
        raise KeyError(f"{name!r} belongs to adapter {adapter!r}, not {ADAPTER_NAME!r}")
    wrappers = ""
    while module.endswith(".base_layer"):
        module, wrappers = module.removesuffix(".base_layer"), wrappers + ".base_layer"
    if which == "magnitude_vector":
        return f"base_model.model.{hf_module_path(module)}{wrappers}.lora_magnitude_vector"
    return f"base_model.model.{hf_module_path(module)}{wrappers}.lora_{which}.{tensor}"
