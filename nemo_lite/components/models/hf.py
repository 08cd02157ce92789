"""Hugging Face Llama checkpoints <-> :class:`LlamaForCausalLM`: the key map, config.json, safetensors.

Everything Hugging Face-specific is in this file: the one parameter-name table (:data:`HF_KEY_MAP`),
the config.json translation (both the ``rope_scaling`` form and transformers 5's ``rope_parameters``),
loading (meta-device construction, then each tensor read once with safetensors straight into the
target dtype and device; pickle files are never read) and saving (sharded safetensors written into
a temporary directory that replaces the target in one rename).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.components.models.config import LlamaConfig, RopeScaling

# nemo_lite parameter name -> Hugging Face name; "{i}" is the layer index. Biases appear only when
# config.attention_bias / config.mlp_bias are set; lm_head.weight only when the embedding is untied.
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
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.mlp.gate_proj.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.mlp.gate_proj.bias": "model.layers.{i}.mlp.gate_proj.bias",
    "layers.{i}.mlp.up_proj.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.mlp.up_proj.bias": "model.layers.{i}.mlp.up_proj.bias",
    "layers.{i}.mlp.down_proj.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.mlp.down_proj.bias": "model.layers.{i}.mlp.down_proj.bias",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# A tied checkpoint may carry a copy of the embedding as lm_head.weight; it is not read.
TIED_OUTPUT_KEY = "lm_head.weight"
# Buffers that checkpoints written by old transformers versions contain; they hold no weights.
IGNORED_HF_KEYS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_LAYER_PREFIX = re.compile(r"^layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A Hugging Face directory that cannot be loaded as this model (the message says why)."""


def to_hf_key(name: str) -> str:
    """The Hugging Face name of one of our parameters, through :data:`HF_KEY_MAP`."""
    match = _LAYER_PREFIX.match(name)
    template = f"layers.{{i}}.{name[match.end() :]}" if match else name
    if template not in HF_KEY_MAP:
        raise KeyError(f"parameter {name!r} has no entry in HF_KEY_MAP")
    return HF_KEY_MAP[template].format(i=match.group(1)) if match else HF_KEY_MAP[template]


# ---- config.json -----------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
    """Our config from a Hugging Face ``config.json`` dict; missing optional keys take transformers'
    LlamaConfig defaults, so both sides read the same file the same way."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"model_type={model_type!r} is not supported; accepted model_type: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks required keys: {', '.join(missing)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={hf['hidden_act']!r} is not supported; the MLP is SwiGLU (silu)")

    # transformers >= 5 writes "rope_parameters" (with rope_theta inside); older versions write a
    # top-level "rope_theta" and "rope_scaling" (null for the default rope). "rope_scaling" wins when
    # both are present, as in transformers.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    rope_scaling = None
    if rope_type == "llama3":
        rope_scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(
                rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
            ),
        )

    def first(token_id):  # eos_token_id may be a list (Llama 3 Instruct): the first one delimits documents
        if isinstance(token_id, list):
            return token_id[0] if token_id else None
        return token_id

    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"),
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        bos_token_id=first(hf.get("bos_token_id", 1)),
        eos_token_id=first(hf.get("eos_token_id", 2)),
        pad_token_id=first(hf.get("pad_token_id")),
        initializer_range=hf.get("initializer_range", 0.02),
    )


def config_to_hf(config: LlamaConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``config.json`` dict that transformers 4.x and 5.x both read as this model."""
    scaling = config.rope_scaling
    rope_scaling = None
    if scaling is not None:
        rope_scaling = {
            "rope_type": scaling.rope_type,
            "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_embeddings,
        }
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        # Both rope forms: transformers < 5 reads rope_theta/rope_scaling, >= 5 reads rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}
        if rope_scaling is None
        else {**rope_scaling, "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "mlp_bias": config.mlp_bias,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "initializer_range": config.initializer_range,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


# ---- load ------------------------------------------------------------------------------------------


def read_config(path: str | Path) -> LlamaConfig:
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file} not found: not a Hugging Face model directory")
    with open(config_file) as f:
        hf = json.load(f)
    try:
        return config_from_hf(hf)
    except CheckpointError as e:
        raise CheckpointError(f"{config_file}: {e}") from None


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the safetensors file that holds it (single file or index)."""
    from safetensors import safe_open

    path = Path(path)
    if (path / INDEX_FILE).is_file():
        with open(path / INDEX_FILE) as f:
            weight_map = json.load(f)["weight_map"]
        files = {name: path / file for name, file in weight_map.items()}
        absent = sorted({str(file) for file in files.values() if not file.is_file()})
        if absent:
            raise CheckpointError(f"{path / INDEX_FILE} names shard files that do not exist: {', '.join(absent)}")
        return files
    if (path / SINGLE_FILE).is_file():
        with safe_open(path / SINGLE_FILE, framework="pt") as f:
            return dict.fromkeys(f.keys(), path / SINGLE_FILE)
    raise CheckpointError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {path} (only safetensors are read; pickle .bin files are not)"
    )


def _tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading any tensor data."""
    from safetensors import safe_open

    shapes = {}
    for file, names in _group_by_file(files).items():
        with safe_open(file, framework="pt") as f:
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
    attention: str = "sdpa",
    attn_mask_type: str = "causal",
    fixed_block_size: int | None = None,
    attention_options: Any = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a Hugging Face Llama directory into ``cls`` (:class:`~nemo_lite.components.models.llama.LlamaForCausalLM`).

    The model is built on the meta device, its storage allocated once in ``dtype`` on ``device``
    (``to_empty``), and each checkpoint tensor is read and copied into place one at a time, so peak
    memory is the model plus one tensor. Every missing, unexpected and mis-shaped tensor is reported
    in one :class:`CheckpointError`.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")
    config = read_config(path)
    with torch.device("meta"):
        model = cls(
            config,
            attention=attention,
            attn_mask_type=attn_mask_type,
            fixed_block_size=fixed_block_size,
            attention_options=attention_options,
        )

    files = checkpoint_files(path)
    expected = {to_hf_key(name): tuple(t.shape) for name, t in model.state_dict().items()}
    skipped = {name for name in files if IGNORED_HF_KEYS.fullmatch(name)}
    if config.tie_word_embeddings and TIED_OUTPUT_KEY in files:
        skipped.add(TIED_OUTPUT_KEY)
    shapes = _tensor_shapes({name: file for name, file in files.items() if name in expected})
    missing = sorted(set(expected) - set(files))
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
    targets = {to_hf_key(name): t for name, t in model.state_dict().items()}
    with torch.no_grad():
        for file, names in _group_by_file({n: files[n] for n in targets}).items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names:
                    targets[name].copy_(f.get_tensor(name))
    model.tokenizer_dir = path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
    return model


def config_summary(config: LlamaConfig) -> str:
    return (
        f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, heads {config.num_attention_heads}/"
        f"{config.num_key_value_heads}, head_dim {config.head_dim}, vocab {config.vocab_size}, "
        f"tied={config.tie_word_embeddings}, attention_bias={config.attention_bias}, mlp_bias={config.mlp_bias}"
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy, in order; a tensor larger than the limit gets a shard of its own (as transformers)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    max_shard_size: int | str = "2GB",
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write ``model`` as a Hugging Face Llama directory: config.json, safetensors (sharded with an
    index beyond ``max_shard_size``) and the tokenizer files of ``tokenizer_dir`` (default: the
    directory the model was loaded from). Atomic: see :func:`atomic_directory`. Returns the path.
    """
    from safetensors.torch import save_file

    max_bytes = parse_size(max_shard_size)
    tensors = {to_hf_key(name): t.detach() for name, t in model.state_dict().items()}
    dtype = model.embed_tokens.weight.dtype
    tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else model.tokenizer_dir
    shards = _shards(tensors, max_bytes)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with atomic_directory(path) as tmp:
        with open(tmp / CONFIG_NAME, "w") as f:
            json.dump(config_to_hf(model.config, dtype), f, indent=2, sort_keys=True)
            f.write("\n")
        for shard, file in zip(shards, names, strict=True):  # one shard at a time on the CPU
            save_file({k: t.cpu().contiguous() for k, t in shard.items()}, tmp / file, metadata={"format": "pt"})
        if len(shards) > 1:
            index = {
                "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                "weight_map": {name: file for shard, file in zip(shards, names, strict=True) for name in shard},
            }
            with open(tmp / INDEX_FILE, "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer_dir / name).is_file():
                    shutil.copy2(tokenizer_dir / name, tmp / name)
    return Path(path).expanduser().absolute()
