"""A trained model ready to generate or be evaluated: a checkpoint found from what a user has at hand.

    model, tokenizer = load_for_inference("runs/finetune")              # a run_dir: its hf/ export
    model, tokenizer = load_for_inference("/models/SmolLM2-135M")       # a Hugging Face directory
    model, tokenizer = load_for_inference("HuggingFaceTB/SmolLM2-135M") # a hub id (through the HF cache)
    model, tokenizer = load_for_inference("/models/base", adapter="runs/lora/adapter")  # base + PEFT adapter

A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as ``run_dir/adapter`` or
PEFT's ``save_pretrained`` writes it) is merged into the base (``W + alpha / r * B @ A``); a run_dir trained with
LoRA already holds the merged model in ``hf/``. The model attends with sdpa and causal masks: generation and
evaluation see each prompt whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nemo_lite.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dir(path: str | Path) -> str:
    """``path`` as a Hugging Face directory or hub id: a run_dir's ``hf/`` export, a directory with a
    config.json, or (anything else that does not exist locally) a hub id."""
    local = Path(path).expanduser()
    if (local / "hf" / "config.json").is_file():
        return str(local / "hf")
    if (local / "config.json").is_file():
        return str(local)
    if local.exists():
        raise ConfigError(
            f"{local} is neither a run_dir with an hf/ export nor a Hugging Face directory (no config.json); "
            "pass a run_dir, a directory with config.json + safetensors, or a hub id"
        )
    return str(path)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not supported; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def load_for_inference(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[Any, Any]:
    """The model (eval mode, on ``device`` in ``dtype``) and its Hugging Face tokenizer."""
    import transformers

    from nemo_lite.components.models import AutoModelForCausalLM
    from nemo_lite.components.models.family import family_of_checkpoint, resolve_pretrained

    source = resolve_pretrained(checkpoint_dir(path))
    if adapter is None:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device=device)
    else:
        model = _merged_with_adapter(family_of_checkpoint(source), source, Path(adapter).expanduser())
        model = model.to(device=device, dtype=dtype)
    if model.tokenizer_dir is None:
        raise ConfigError(f"{source} has no tokenizer files; save the tokenizer beside config.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model.tokenizer_dir))
    return model.eval(), tokenizer


def _merged_with_adapter(family: Any, base_dir: str | Path, adapter: Path):
    """The base with the PEFT LoRA adapter at ``adapter`` merged in."""
    from safetensors.torch import load_file

    from nemo_lite.components.models.hf import read_config, to_hf_key
    from nemo_lite.training.converters.lora import (
        ADAPTER_CONFIG,
        ADAPTER_NAME,
        ADAPTER_WEIGHTS,
        PeftSection,
        block_linears,
        merged_model,
    )

    if not (adapter / ADAPTER_CONFIG).is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"adapter={adapter} is not a PEFT adapter directory ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    settings = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if settings.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"adapter={adapter} is a {settings['peft_type']} adapter; only LoRA adapters are supported")
    if settings.get("use_rslora") or settings.get("use_dora"):
        raise ConfigError(f"adapter={adapter} uses rsLoRA or DoRA; only plain LoRA adapters are supported")
    with torch.device("meta"):  # only the module names are needed here
        base = family.model_cls(read_config(base_dir))
    linears = block_linears(base, family)  # nemo_lite module path -> Hugging Face leaf name
    by_hf = {f"base_model.model.{to_hf_key(f'{path}.weight').removesuffix('.weight')}": path for path in linears}
    adapters = {}
    for key, tensor in load_file(str(adapter / ADAPTER_WEIGHTS)).items():
        module, _, rest = key.partition(".lora_")
        if module not in by_hf:
            raise ConfigError(f"adapter={adapter} holds {key!r}, which names no linear of the base {base_dir}")
        which, _, tensor_name = rest.partition(".")
        adapters[f"{by_hf[module]}.lora_{which}.{ADAPTER_NAME}.{tensor_name}"] = tensor
    targets = sorted({linears[name.split(".lora_")[0]] for name in adapters})
    section = PeftSection(
        method="lora", r=int(settings["r"]), alpha=float(settings["lora_alpha"]), target_modules=targets
    )
    return merged_model(family, base_dir, adapters, section=section, target_names=targets)
