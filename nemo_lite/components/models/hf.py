"""Hugging Face checkpoints <-> the decoder's families: the key map, config.json, safetensors.

Everything Hugging Face-specific is in this file (and in ``hub.py``, which finds a hub id in the cache),
except what is one family's own: its ``model_type``, architecture name, config.json defaults and extra keys,
refusals and key-map differences are the family entry's :class:`~nemo_lite.components.models.family.HFFacts`,
read from the registry here. This file has the one parameter-name table of the shared decoder
(:data:`HF_KEY_MAP`), the config.json translation onto a family's config class (both the ``rope_scaling``
form and transformers 5's ``rope_parameters``), loading (meta-device construction, then each tensor read
once with safetensors straight into the target dtype and device; pickle files are never read) and saving
(sharded safetensors written into a temporary directory that replaces the target in one rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models.decoder_config import ROPE_FIELDS, ROPE_TYPES, DecoderConfig, RopeScaling
from nemo_lite.components.models.family import (
    ModelFamily,
    family_of_config,
    family_of_model_type,
    model_families,
)
from nemo_lite.components.models.hub import (
    CHAT_TEMPLATE_FILE,
    CONFIG_NAME,
    GENERATION_CONFIG,
    INDEX_FILE,
    SINGLE_FILE,
    TOKENIZER_CONFIG,
    TOKENIZER_FILES,
    resolve_pretrained,
)
from nemo_lite.errors import NemoLiteError

# nemo_lite parameter name -> Hugging Face name; "{i}" is the layer index. Biases appear only where the
# config puts them (qkv_bias, o_bias, mlp_bias), q_norm/k_norm only with qk_norm, lm_head.weight
# only when the embedding is untied. A family whose names differ says so in its HFFacts.key_map.
HF_KEY_MAP: dict[str, str] = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.q_proj.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.attention.k_proj.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.attention.v_proj.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.attention.o_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention.o_proj.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "layers.{i}.attention.q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.gate_proj.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.up_proj.bias",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.down_proj.bias",
    # attention sinks (attention_sinks) and a mixture of experts' router and stacked experts (moe.py)
    "layers.{i}.attention.sinks": "model.layers.{i}.self_attn.sinks",
    "layers.{i}.mlp.router.weight": "model.layers.{i}.mlp.router.weight",
    "layers.{i}.mlp.router.bias": "model.layers.{i}.mlp.router.bias",
    "layers.{i}.mlp.experts.gate_up_proj": "model.layers.{i}.mlp.experts.gate_up_proj",
    "layers.{i}.mlp.experts.gate_up_proj_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "layers.{i}.mlp.experts.down_proj": "model.layers.{i}.mlp.experts.down_proj",
    "layers.{i}.mlp.experts.down_proj_bias": "model.layers.{i}.mlp.experts.down_proj_bias",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# A tied checkpoint may carry a copy of the embedding as lm_head.weight; it is not read (a distinct one is
# refused: see _check_tied_copy).
TIED_OUTPUT_KEY = "lm_head.weight"
# Buffers that checkpoints written by old transformers versions contain; they hold no weights.
IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

SUPPORTED_ROPE_TYPES = ("default", *ROPE_TYPES)
# The ids that config.json and generation_config.json carry for transformers' generate.
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# The dtypes an export writes its weights in (trainer.export_dtype).
EXPORT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# transformers' value of each optional key a config.json may lack, the same in every family's config class
# (a family's HFFacts.defaults add to and override these).
_COMMON_DEFAULTS: dict[str, Any] = dict(
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None
)
# Keys written to every config.json for transformers' sake (a family's HFFacts.extras add to these).
_COMMON_EXTRAS: dict[str, Any] = dict(attention_dropout=0.0, use_cache=True)
# The keys of rope_parameters / rope_scaling each rope_type reads (besides rope_type/type and rope_theta).
_ROPE_KEYS: dict[str, tuple[str, ...]] = {"default": (), **ROPE_FIELDS}

_LAYER_PREFIX = re.compile(r"^layers\.(\d+)\.")


class CheckpointError(NemoLiteError, ValueError):
    """A Hugging Face directory that cannot be loaded as this model (the message says why)."""


def key_map(family: ModelFamily | None = None) -> dict[str, str]:
    """The parameter-name table of ``family``: :data:`HF_KEY_MAP` with the family's differences."""
    return HF_KEY_MAP if family is None or not family.hf.key_map else {**HF_KEY_MAP, **family.hf.key_map}


def hf_layout(
    shapes: dict[str, tuple[int, ...]], family: ModelFamily
) -> dict[str, tuple[str, int | None, slice | None, tuple[int, ...]]]:
    """Each checkpoint tensor of a model whose parameters have ``shapes``: Hugging Face name -> (our name,
    expert, rows, shape), expert and rows None where the tensor is our whole parameter, else the checkpoint
    tensor is ``ours[expert, rows]`` (the family's ``HFFacts.expert_keys``)."""
    keys, experts = key_map(family), family.hf.expert_keys
    layout = {}
    for name, shape in shapes.items():
        match = _LAYER_PREFIX.match(name)
        template = f"layers.{{i}}.{name[match.end() :]}" if match else name
        if template not in experts:
            layout[to_hf_key(name, keys)] = (name, None, None, shape)
            continue
        parts = experts[template]
        rows = shape[1] // len(parts)
        for e in range(shape[0]):
            for j, part in enumerate(parts):
                hf_name = part.format(i=match.group(1), e=e)
                layout[hf_name] = (name, e, slice(j * rows, (j + 1) * rows), (rows, *shape[2:]))
    return layout


def to_hf_key(name: str, keys: dict[str, str] = HF_KEY_MAP) -> str:
    """The Hugging Face name of one of our parameters, through ``keys`` (default :data:`HF_KEY_MAP`)."""
    match = _LAYER_PREFIX.match(name)
    template = f"layers.{{i}}.{name[match.end() :]}" if match else name
    if template not in keys:
        raise KeyError(f"parameter {name!r} has no entry in HF_KEY_MAP")
    return keys[template].format(i=match.group(1)) if match else keys[template]


# ---- config.json -----------------------------------------------------------------------------------


def model_type_of(config: DecoderConfig) -> str:
    """The config.json ``model_type`` of one of our configs (its family's first)."""
    return family_of_config(config).hf.model_types[0]


def supported_model_types() -> tuple[str, ...]:
    """Every config.json ``model_type`` a registered family loads."""
    return tuple(t for family in model_families() for t in family.hf.model_types)


def _rope_from_hf(hf: dict[str, Any], max_position_embeddings: int) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, rope_scaling)`` from either config form. transformers >= 5 writes "rope_parameters"
    (with rope_theta inside); older versions write a top-level "rope_theta" and "rope_scaling" (null for
    the default rope). "rope_scaling" wins when both are present, as in transformers."""
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    nested = sorted(key for key, value in rope.items() if isinstance(value, dict))
    if nested:  # transformers' form for models whose layer types each have a rope: not one these families read
        raise CheckpointError(
            f"rope_parameters is given per layer type ({', '.join(nested)}); this family has one rotary embedding "
            "for every layer: give rope_parameters as one object (rope_type, rope_theta, ...)"
        )
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", None) or rope.pop("type", "default")
    rope.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor")) or 1.0
    if partial != 1.0:
        raise CheckpointError(f"partial_rotary_factor={partial!r} is not supported; only 1.0 (every dimension rotates)")
    if rope_type == "yarn" and rope.get("mscale") and rope.get("mscale_all_dim"):
        raise CheckpointError(
            "yarn rope with mscale and mscale_all_dim (DeepSeek's attention factor) is not supported; "
            "give attention_factor instead"
        )
    # Keys this rope_type does not read are ignored, as transformers ignores them.
    rope = {key: value for key, value in rope.items() if key in _ROPE_KEYS[rope_type]}
    if rope_type == "default":
        return rope_theta, None
    if rope_type in ("llama3", "yarn"):
        # As transformers: a top-level original_max_position_embeddings wins, then the rope dict's, then
        # max_position_embeddings.
        original = hf.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        rope["original_max_position_embeddings"] = int(original or max_position_embeddings)
    if rope_type == "yarn":
        if rope.get("factor") is None:  # transformers: the ratio of the two context lengths
            rope["factor"] = max_position_embeddings / rope["original_max_position_embeddings"]
        for key in ("beta_fast", "beta_slow"):  # null or 0 means the default, as in transformers
            if not rope.get(key):
                rope.pop(key, None)
    if "factor" not in rope:
        raise CheckpointError(f"{rope_type} rope scaling needs a factor; config.json has none")
    try:
        return rope_theta, RopeScaling(rope_type=rope_type, **rope)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"rope scaling {rope_type}: {err}") from None


def config_from_hf(hf: dict[str, Any], model_types: tuple[str, ...] | None = None) -> DecoderConfig:
    """Our config from a Hugging Face ``config.json`` dict, the class chosen by ``model_type`` (one of
    ``model_types``; None: any registered family's). Missing optional keys take transformers' defaults for
    that model_type (the family's ``HFFacts.defaults``), so both sides read the same file the same way."""
    model_type = hf.get("model_type")
    supported = supported_model_types()
    model_types = supported if model_types is None else model_types
    if model_type not in model_types:
        others = sorted(set(supported) - set(model_types))
        hint = f" (AutoModelForCausalLM also loads {', '.join(others)})" if others and model_type in others else ""
        raise CheckpointError(
            f"model_type={model_type!r} is not supported; accepted model_type: {', '.join(sorted(model_types))}{hint}"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks required keys: {', '.join(missing)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported; the MLP is SwiGLU (silu)")
    for key in ("attention_dropout", "mlp_dropout"):
        if hf.get(key):
            raise CheckpointError(
                f"{key}={hf[key]!r} is not supported (nemo_lite has no dropout): set it to 0.0 in config.json"
            )
    if hf.get("quantization_config") and _quant_method(hf) != "mxfp4":  # MXFP4 experts: dequantized on loading
        raise CheckpointError(
            "quantization_config is not supported: the weights must be plain float tensors (load an "
            "unquantized checkpoint)"
        )
    family = family_of_model_type(model_type)
    if family.hf.check is not None:
        family.hf.check(hf)
    config_cls = family.config_cls
    _check_field_types(hf, config_cls)
    defaults = {**_COMMON_DEFAULTS, **family.hf.defaults}
    values = {}
    hf = {**hf, **{ours: hf[theirs] for theirs, ours in family.hf.aliases.items() if theirs in hf and ours not in hf}}
    for field in dataclasses.fields(config_cls):
        if field.name in ("rope_theta", "rope_scaling"):
            continue
        if field.name in hf:
            values[field.name] = hf[field.name]
        elif field.name in defaults:
            values[field.name] = defaults[field.name]
    for key in SPECIAL_IDS:
        # eos_token_id may be a list (Llama 3 Instruct): the first one delimits documents; the export writes
        # the whole list again (generation_config_of)
        if isinstance(values.get(key), list):
            values[key] = values[key][0] if values[key] else None
    # A family that gives no default for it takes its config class's.
    values.setdefault("max_position_embeddings", config_cls.__dataclass_fields__["max_position_embeddings"].default)
    values["rope_theta"], values["rope_scaling"] = _rope_from_hf(hf, values["max_position_embeddings"])
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"model_type={model_type!r}: {err}") from None


def _quant_method(hf: dict[str, Any]) -> Any:
    quantization = hf.get("quantization_config")
    return quantization.get("quant_method") if isinstance(quantization, dict) else None


def config_to_hf(config: DecoderConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` dict that transformers 4.x and 5.x both read as this model, every field
    of the config under its Hugging Face name."""
    facts = family_of_config(config).hf
    out: dict[str, Any] = {"architectures": [facts.architecture], "model_type": facts.model_types[0]}
    for field in dataclasses.fields(config):
        if field.name != "rope_scaling":
            out[field.name] = getattr(config, field.name)
    rope_scaling = None if config.rope_scaling is None else config.rope_scaling.fields_of_type()
    dtype_name = str(dtype).removeprefix("torch.")
    out.update(
        hidden_act="silu",
        # Both rope forms: transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters.
        rope_scaling=rope_scaling,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}
        if rope_scaling is None
        else {**rope_scaling, "rope_theta": config.rope_theta},
        torch_dtype=dtype_name,
        dtype=dtype_name,
        **_COMMON_EXTRAS,
        **facts.extras,
    )
    for theirs, ours in facts.aliases.items():  # transformers' own name too, where it has one
        out.setdefault(theirs, out[ours])
    return out


# ---- load ------------------------------------------------------------------------------------------


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a CheckpointError naming the file."""
    try:
        with open(file, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not a text file: replace it with the model's JSON") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): fix it or fetch it again"
        ) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file} holds a JSON {type(value).__name__}, not an object: fix it or fetch it again")
    return value


def _check_field_types(hf: dict[str, Any], config_cls: type) -> None:
    """A config.json value of the wrong JSON type (a string where a number belongs) names its key."""
    import typing

    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name not in hf or hf[field.name] is None:
            continue
        value, hint = hf[field.name], hints.get(field.name)
        args = set(typing.get_args(hint)) or {hint}
        if typing.get_origin(hint) is list:
            ok = isinstance(value, list)
            want = "a list"
        elif bool in args:
            ok = isinstance(value, bool)
            want = "true or false"
        elif float in args:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            want = "a number"
        elif int in args:
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                field.name.endswith("_token_id") and isinstance(value, list)
            )
            want = "an integer"
        else:
            continue
        if not ok:
            raise CheckpointError(f"{field.name}={value!r} must be {want}")


def read_config(path: str | Path, model_types: tuple[str, ...] | None = None) -> DecoderConfig:
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: not a Hugging Face model directory")
    hf = read_json_object(config_file)
    try:
        return config_from_hf(hf, model_types)
    except CheckpointError as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def _inside_the_directory(file: object) -> bool:
    """A shard name of an index stays in the checkpoint's directory: relative, no ``..``. Judged on the name,
    not on where links lead (a hub cache's snapshot files are links into its blob store)."""
    if not isinstance(file, str) or not file or "\\" in file:
        return False
    parts = Path(file).parts
    return not Path(file).is_absolute() and ".." not in parts


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file that holds it (single file or index)."""

    path = Path(path)
    if (path / INDEX_FILE).is_file():
        weight_map = read_json_object(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{path / INDEX_FILE} has no weight_map object: fix it or fetch it again")
        outside = sorted({str(f) for f in weight_map.values() if not _inside_the_directory(f)})
        if outside:
            raise CheckpointError(
                f"{path / INDEX_FILE} names shard files outside its directory: {', '.join(outside)}; an index "
                "names files beside it (model-00001-of-00002.safetensors): fix it or fetch it again"
            )
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(file) for file in files.values() if not file.is_file()})
        if absent:
            raise CheckpointError(f"{path / INDEX_FILE} names shard files that do not exist: {', '.join(absent)}")
        return files
    if (path / SINGLE_FILE).is_file():
        with _safetensors(path / SINGLE_FILE) as f:
            return dict.fromkeys(f.keys(), path / SINGLE_FILE)
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors are read; pickle .bin files are not)"
    )


@contextmanager
def _safetensors(file: Path) -> Iterator[Any]:
    """``safe_open(file)``, where a damaged file (cut short, a header that lies, a pickle under a safetensors
    name) is a CheckpointError naming it, raised on opening it or on reading a tensor from it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            yield f
    except SafetensorError as err:
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({err}): fetch or convert the checkpoint again"
        ) from None


def _tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading any tensor data."""
    shapes = {}
    for file, names in _group_by_file(files).items():
        with _safetensors(file) as f:
            for name in names:
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def _group_by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name, file in files.items():
        by_file[file].append(name)
    return by_file


def load_pretrained(
    cls: type[nn.Module],
    path: str | Path,
    *,
    attention: AttentionConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a Hugging Face directory (or a hub id, see :func:`~nemo_lite.components.models.hub.resolve_pretrained`)
    into ``cls``, a family's model class (``LlamaForCausalLM``, ...), whose ``config_class`` decides the
    model_types it accepts; ``attention`` says how it attends (None: sdpa, causal).

    The model is built on the meta device, its storage allocated once in ``dtype`` on ``device``
    (``to_empty``), and each checkpoint tensor is read and copied into place one at a time, so peak
    memory is the model plus one tensor. Every missing, unexpected and mis-shaped tensor is reported
    in one :class:`CheckpointError`.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    path = resolve_pretrained(path)
    config_class = getattr(cls, "config_class", DecoderConfig)
    model_types = tuple(t for f in model_families() if issubclass(f.config_cls, config_class) for t in f.hf.model_types)
    config = read_config(path, model_types)
    with torch.device("meta"):
        model = cls(config, attention=attention)
    family = family_of_config(config)
    keys = key_map(family)

    files = checkpoint_files(path)
    layout = hf_layout({name: tuple(t.shape) for name, t in model.state_dict().items()}, family)
    expected = {hf_name: shape for hf_name, (*_, shape) in layout.items()}
    skipped = {name for name in files if IGNORED_HF_KEYS.fullmatch(name)}
    # MXFP4 weights (gpt-oss's published experts): NAME_blocks + NAME_scales in place of NAME, dequantized below.
    packed = {name for name in expected if name not in files and {f"{name}_blocks", f"{name}_scales"} <= set(files)}
    skipped |= {f"{name}_{part}" for name in packed for part in ("blocks", "scales")}
    if config.tie_word_embeddings and TIED_OUTPUT_KEY in files:
        _check_tied_copy(path, files, keys)
        skipped.add(TIED_OUTPUT_KEY)
    shapes = _tensor_shapes({name: file for name, file in files.items() if name in expected})
    missing = sorted(set(expected) - set(files) - packed)
    unexpected = sorted(set(files) - set(expected) - skipped)
    misshaped = sorted(name for name, shape in shapes.items() if shape != expected[name])
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected tensors: {', '.join(unexpected)}")
        if misshaped:
            problems.append(
                "wrong shapes: "
                + ", ".join(f"{name} is {list(shapes[name])}, expected {list(expected[name])}" for name in misshaped)
            )
        raise CheckpointError(
            f"{path} does not match its config.json ({config_summary(config)}): " + "; ".join(problems)
        )

    model.to(dtype=dtype)  # still on meta: only the dtype of the placeholders changes
    model.to_empty(device=device)
    state = model.state_dict()
    with torch.no_grad():
        for file, names in _group_by_file({n: files[n] for n in layout if n not in packed}).items():
            with _safetensors(file) as f:
                for name in names:
                    ours, expert, rows, _ = layout[name]
                    target = state[ours] if expert is None else state[ours][expert, rows]
                    target.copy_(f.get_tensor(name))
        for name in sorted(packed):
            blocks, scales = (_read_tensor(files[f"{name}_{part}"], f"{name}_{part}") for part in ("blocks", "scales"))
            weight = dequantize_mxfp4(blocks, scales)
            if tuple(weight.shape) != expected[name]:
                raise CheckpointError(
                    f"{path}: {name}_blocks/_scales dequantize to {list(weight.shape)}, expected {list(expected[name])}"
                )
            state[layout[name][0]].copy_(weight)
    model.tokenizer_dir = path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
    return model


def _read_tensor(file: Path, name: str) -> torch.Tensor:
    with _safetensors(file) as f:
        return f.get_tensor(name)


# The 16 values of a 4-bit E2M1 float (MXFP4's elements), by their code: sign bit, 2 exponent bits, 1 mantissa bit.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss's MXFP4 expert weights as float32 ``[E, in, out]`` (the layout its model computes with).

    ``blocks`` ``[E, out, G, 16]`` uint8: each byte two E2M1 codes, the low nibble first, 32 elements per group
    ``G`` along the input dimension; ``scales`` ``[E, out, G]`` uint8: each group's power of two, biased by 127
    (E8M0). Element ``2j`` of a group is ``FP4[byte_j & 15] * 2^(scale - 127)``, element ``2j + 1`` the high
    nibble's. Every value is exact in float32.
    """
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {list(blocks.shape)} do not fit scales {list(scales.shape)}")
    table = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.int64)
    pairs = torch.stack([table[codes & 0x0F], table[codes >> 4]], dim=-1)  # [E, out, G, 16, 2]
    elements = pairs.flatten(-3)  # [E, out, G * 32]
    exponents = (scales.to(torch.int32) - 127).repeat_interleave(2 * blocks.shape[-1], dim=-1)
    return torch.ldexp(elements, exponents.float()).transpose(1, 2).contiguous()


def _check_tied_copy(path: Path, files: dict[str, Path], keys: dict[str, str]) -> None:
    """A tied checkpoint's lm_head.weight is skipped, which is right only when it is the embedding's copy: a
    distinct one would be dropped, so it is refused (config.json and the weights disagree)."""
    embed_key = to_hf_key("embed_tokens.weight", keys)
    if embed_key not in files:
        return  # reported as a missing tensor
    with _safetensors(files[TIED_OUTPUT_KEY]) as f:
        head = f.get_tensor(TIED_OUTPUT_KEY)
    with _safetensors(files[embed_key]) as f:
        embed = f.get_tensor(embed_key)
    if head.shape != embed.shape or not torch.equal(head, embed):
        raise CheckpointError(
            f"{path}: config.json has tie_word_embeddings=true but {TIED_OUTPUT_KEY} differs from {embed_key}, "
            "so it would be dropped: set tie_word_embeddings to false in config.json to train both, or remove "
            f"{TIED_OUTPUT_KEY} from the checkpoint to use the embedding"
        )


def config_summary(config: DecoderConfig) -> str:
    return (
        f"{model_type_of(config)}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, heads "
        f"{config.num_attention_heads}/{config.num_key_value_heads}, head_dim {config.head_dim}, vocab "
        f"{config.vocab_size}, tied={config.tie_word_embeddings}, qkv_bias={config.qkv_bias}, "
        f"o_bias={config.o_bias}, mlp_bias={config.mlp_bias}, qk_norm={config.qk_norm}"
    )


# ---- save ------------------------------------------------------------------------------------------

_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes of ``2000``, ``"2GB"`` (10^9, as transformers) or ``"500MiB"`` (2^20)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", size)
    unit = match.group(2).upper() if match else ""
    if not match or (unit or "B") not in _SIZE_UNITS:
        raise ValueError(f"cannot read {size!r} as a size; use e.g. 2000, '500MB', '2GB', '1GiB'")
    return int(float(match.group(1)) * _SIZE_UNITS[unit or "B"])


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``path``; on success it becomes ``path``.

    On an exception the temporary directory is removed and ``path`` is untouched. An existing
    ``path`` is first renamed aside, then removed once the new directory is in place (if the second
    rename fails, the old directory is put back), so ``path`` never names a half-written directory.
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        share_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _stop_signals_held():
        if not path.exists():
            os.rename(tmp, path)
            return
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _stop_signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then reach the handler they would have reached: a
    handler that raises (the trainer's during an export) must not stop the renames between their first and last
    step, which would leave no directory at ``path``. (Blocking the signals would not do: the kernel hands a
    process-directed signal to another thread, and Python runs the handler in the main thread all the same.)"""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in arrived[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def process_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only be read by setting it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def share_modes(directory: Path) -> None:
    """Give each file in ``directory`` the mode a newly created file gets (0644 under the usual umask):
    safetensors writes its files private (0600), unlike every other file of a checkpoint or an export."""
    mode = 0o666 & ~process_umask()
    for file in directory.rglob("*"):
        if file.is_file() and not file.is_symlink():
            os.chmod(file, mode)


def _shards(
    tensors: dict[str, torch.Tensor], max_bytes: int, element_size: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Greedy, in order, at ``element_size`` bytes per element (default: each tensor's own); a tensor larger than
    the limit gets a shard of its own (as transformers)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * (element_size or t.element_size())
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The dtype a Hugging Face directory stores its weights in: config.json's ``dtype`` (``torch_dtype`` before
    transformers 5), else the embedding's dtype in the safetensors header."""
    path = Path(path)
    hf = read_json_object(path / CONFIG_NAME)
    name = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(name, str) and name.removeprefix("torch.") in EXPORT_DTYPES:
        return EXPORT_DTYPES[name.removeprefix("torch.")]
    files = checkpoint_files(path)
    name = next((n for n in files if n.endswith("embed_tokens.weight")), next(iter(files)))
    with _safetensors(files[name]) as f:
        return f.get_tensor(name).dtype


def generation_config_of(path: str | Path | None, config: DecoderConfig) -> dict[str, Any]:
    """What ``generation_config.json`` of an export holds: the source checkpoint's own (sampling settings kept)
    with the bos/eos/pad ids of its config.json, lists kept (Llama 3 Instruct stops at several ids); without a
    source, the ids of ``config``."""
    out: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        hf = read_json_object(path / CONFIG_NAME)
        out = {key: hf[key] for key in SPECIAL_IDS if hf.get(key) is not None}
        if (path / GENERATION_CONFIG).is_file():
            own = read_json_object(path / GENERATION_CONFIG)
            out = {**out, **{k: v for k, v in own.items() if v is not None and k != "transformers_version"}}
    else:
        out = {key: getattr(config, key) for key in SPECIAL_IDS if getattr(config, key) is not None}
    return out


def eos_ids(generation: dict[str, Any]) -> list[int]:
    """The eos ids of a generation config, as a list (it may hold one id or several)."""
    eos = generation.get("eos_token_id")
    return [] if eos is None else list(eos) if isinstance(eos, list) else [eos]


def write_tokenizer(directory: Path, tokenizer_dir: Path | None, chat_template: str | None = None) -> None:
    """The tokenizer files of ``tokenizer_dir`` copied into ``directory``; ``chat_template`` (the template a run
    trained with) becomes the tokenizer's own: written as chat_template.jinja, which transformers reads before
    tokenizer_config.json's entry, and in that entry too, for versions that read only it."""
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, directory / name)
    if chat_template is None:
        return
    (directory / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    config_file = directory / TOKENIZER_CONFIG
    if config_file.is_file():
        config = read_json_object(config_file)
        if isinstance(config.get("chat_template"), list):  # several named templates: replace the default one
            named = [t for t in config["chat_template"] if t.get("name") != "default"]
            config["chat_template"] = [{"name": "default", "template": chat_template}, *named]
        else:
            config["chat_template"] = chat_template
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    max_shard_size: int | str = "2GB",
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    generation: dict[str, Any] | None = None,
    chat_template: str | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face directory of its family (config.json with the model_type and
    architectures transformers loads it as), safetensors in ``dtype`` (default: the model's; sharded with an
    index beyond ``max_shard_size``), generation_config.json and the tokenizer files of ``tokenizer_dir``
    (default: the directory the model was loaded from), with ``chat_template`` as the tokenizer's own when
    given.

    ``generation`` is generation_config.json's content (default: the config's bos/eos/pad ids); its ids are
    config.json's too, an eos list included. Atomic: see :func:`atomic_directory`. Returns the path.
    """
    max_bytes = parse_size(max_shard_size)
    state = {name: t.detach() for name, t in model.state_dict().items()}
    layout = hf_layout({name: tuple(t.shape) for name, t in state.items()}, family_of_config(model.config))
    # A slice of a stacked expert weight is cloned: safetensors refuses tensors that share storage.
    tensors = {
        hf_name: state[ours] if expert is None else state[ours][expert, rows].clone()
        for hf_name, (ours, expert, rows, _) in layout.items()
    }
    dtype = dtype or model.embed_tokens.weight.dtype
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model.tokenizer_dir
    generation = dict(generation) if generation is not None else generation_config_of(None, model.config)
    element_size = torch.empty((), dtype=dtype).element_size()
    shards = _shards(tensors, max_bytes, element_size)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with atomic_directory(path) as tmp:
        config = config_to_hf(model.config, dtype)
        config.update({key: generation[key] for key in SPECIAL_IDS if key in generation})
        _write_json(tmp / CONFIG_NAME, config)
        _write_json(tmp / GENERATION_CONFIG, generation)
        for shard, file in zip(shards, names, strict=True):  # one shard at a time on the CPU
            tensors_of_shard = {k: t.cpu().to(dtype).contiguous() for k, t in shard.items()}
            save_safetensors(tensors_of_shard, tmp / file, named=Path(path).expanduser().absolute() / file)
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * element_size for t in tensors.values())},
                "weight_map": {name: file for shard, file in zip(shards, names, strict=True) for name in shard},
            }
            _write_json(tmp / INDEX_FILE, index)
        write_tokenizer(tmp, tokenizer_dir, chat_template)
    return Path(path).expanduser().absolute()


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path, *, named: Path | None = None) -> None:
    """``safetensors.torch.save_file`` whose I/O failures are OSErrors naming the file (``named``: the name to
    report, the final path of a file written in a temporary directory). safetensors reports a full disk as a
    SafetensorError, which would read as a damaged file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(named or file)) from err


def _write_json(file: Path, value: dict[str, Any]) -> None:
    with open(file, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
