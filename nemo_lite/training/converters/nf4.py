"""QLoRA's frozen base: the decoder blocks' frozen linears stored in 4-bit NormalFloat (NF4) through torchao
(``peft.quantize_base=nf4``, on top of ``peft=lora``; docs/finetuning.md, "QLoRA").

A quantized linear keeps its module and its parameter name; only its weight becomes torchao's ``NF4Tensor``: per
block of 64 consecutive values, the index (4 bits) of the nearest of NF4's 16 levels scaled by the block's absolute
maximum, and each block's scale itself stored in int8 per group of 256 blocks (the QLoRA paper's double
quantization): about 0.52 bytes per weight. ``F.linear`` on it dequantizes the weight to the input's dtype and runs
an ordinary matmul (forward and input gradient; the weight gets none), so PEFT's LoRA layer, which calls its base
linear, autocast, ``torch.compile`` and FSDP2 (torchao implements its all-gather of the 4-bit data) see an ordinary
frozen linear.

Quantizing is deterministic: the same weights in the same dtype give the same NF4 tensor, so a resumed run quantizes
its base again from ``model.pretrained_path`` rather than saving it, and the merged export quantizes the float32 base
read from disk the same way and dequantizes it (:func:`round_trip`) before PEFT adds the adapters.

A linear is quantized when its number of weights is a multiple of 64 x 256 (whole blocks and whole groups of
scales); the others (small ones, e.g. a tiny model's key projection) stay in the frozen dtype.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
from torch import nn

QUANTIZE_CHOICES = ("none", "nf4")
NF4_BLOCK = 64  # weights per scale (the QLoRA paper's block size)
NF4_SCALER_BLOCK = 256  # scales per int8 group of the double quantization
INSTALL_HINT = "pip install 'nemo_lite[qlora]'"


def nf4_missing() -> str | None:
    """What NF4 quantization lacks here (None: it can run), as the end of a one-line refusal."""
    if importlib.util.find_spec("torchao") is None:
        return f"torchao, which is not installed: {INSTALL_HINT}"
    try:
        from torchao.quantization import to_nf4  # noqa: F401
    except ImportError:
        import torchao

        return f"torchao's NF4Tensor, which torchao {torchao.__version__} lacks: pip install 'torchao>=0.18'"
    return None


def nf4_keep_reason(weight_shape: torch.Size | tuple[int, ...]) -> str | None:
    """Why a frozen linear whose weight has ``weight_shape`` is not quantized (None: it is)."""
    numel = math.prod(weight_shape)
    if numel % (NF4_BLOCK * NF4_SCALER_BLOCK):
        return f"{numel} weights, not a multiple of {NF4_BLOCK} x {NF4_SCALER_BLOCK}"
    return None


def nf4_bytes(numel: int) -> int:
    """A floor under the bytes of ``numel`` weights in NF4: 4 bits each and an int8 scale per block."""
    return numel // 2 + numel // NF4_BLOCK


def is_nf4(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "NF4Tensor"


def frozen_block_linears(model: nn.Module, family: Any) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules inside the family's decoder blocks whose weight is frozen (after PEFT's injection:
    the adapted layers' base linears and the linears left without adapters), by module path."""
    in_blocks = {id(m) for block in family.blocks(model) for m in block.modules()}
    return {
        name: module
        for name, module in model.named_modules()
        if type(module) is nn.Linear and id(module) in in_blocks and not module.weight.requires_grad
    }


def shard_problem(weight_shape: torch.Size | tuple[int, ...], world_size: int) -> str | None:
    """Why FSDP2 cannot shard a quantized weight of ``weight_shape`` over ``world_size`` ranks (None: it can). Each
    rank's rows must hold whole groups of scales: torchao splits the 4-bit data and the scales alike, unpadded."""
    rows, numel = weight_shape[0], math.prod(weight_shape)
    group = NF4_BLOCK * NF4_SCALER_BLOCK
    if rows % world_size or (numel // world_size) % group:
        return f"its {list(weight_shape)} weight does not split into {world_size} row shards of whole groups of {group}"
    return None


@torch.no_grad()
def quantize_linears(
    linears: dict[str, nn.Linear], *, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[list[str], dict[str, str]]:
    """Replace the weight of each of ``linears`` that :func:`nf4_keep_reason` accepts by its NF4 quantization, made
    from the weight cast to ``dtype`` (the dtype it dequantizes to) on ``device`` (None: where it is); the others are
    cast to ``dtype``. Returns the quantized paths and the kept ones (-> why)."""
    from torchao.quantization import to_nf4

    quantized, kept = [], {}
    for name, linear in linears.items():
        weight = linear.weight.detach().to(device=device, dtype=dtype)
        reason = nf4_keep_reason(weight.shape)
        if reason is None:
            weight = to_nf4(weight.contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK)
            quantized.append(name)
        else:
            kept[name] = reason
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().to(device=device, dtype=dtype), requires_grad=False)
    return quantized, kept


def quantize_base(model: nn.Module, family: Any, *, dtype: torch.dtype, device: torch.device | None) -> str:
    """Quantize the frozen linears of ``model``'s blocks (:func:`quantize_linears`) on ``device``, then move the rest
    of the model there (None: leave it where it is). Returns what was done, in a few words for the log. Under
    torchrun a weight that FSDP2 could not shard is refused in one line."""
    from nemo_lite.errors import ConfigError

    linears = frozen_block_linears(model, family)
    dist = torch.distributed
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for name, linear in linears.items():
        problem = None if nf4_keep_reason(linear.weight.shape) else shard_problem(linear.weight.shape, world_size)
        if problem is not None:
            raise ConfigError(
                f"peft.quantize_base=nf4 on {world_size} ranks: {name}: {problem}; use fewer ranks, or "
                "peft.quantize_base=none"
            )
    quantized, kept = quantize_linears(linears, dtype=dtype, device=device)
    if device is not None:
        model.to(device)
    leaf = lambda path: path.removesuffix(".base_layer").rsplit(".", 1)[-1]  # noqa: E731
    name = str(dtype).removeprefix("torch.")
    text = (
        f"base linears in NF4 (torchao, from {name}): {len(quantized)} ({', '.join(sorted(set(map(leaf, quantized))))})"
    )
    if kept:
        why = sorted({f"{leaf(path)}: {reason}" for path, reason in kept.items()})
        text += f"; {len(kept)} kept in {name} ({'; '.join(why)})"
    return text


@torch.no_grad()
def round_trip(weight: torch.Tensor, *, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """``weight`` as the quantized base computes with it: cast to ``dtype``, quantized to NF4 (on ``device``, None:
    where it is) and dequantized, returned in ``weight``'s dtype and device. Weights :func:`nf4_keep_reason` refuses
    come back cast to ``dtype`` and back only."""
    from torchao.quantization import to_nf4

    low = weight.detach().to(device=device, dtype=dtype)
    if nf4_keep_reason(weight.shape) is None:
        low = to_nf4(low.contiguous(), NF4_BLOCK, NF4_SCALER_BLOCK).get_original_weight()
    return low.to(device=weight.device, dtype=weight.dtype)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """A quantized weight as a plain tensor in its dtype (any other tensor as it is)."""
    return weight.get_original_weight() if is_nf4(weight) else weight


__all__ = [
    "NF4_BLOCK",
    "NF4_SCALER_BLOCK",
    "QUANTIZE_CHOICES",
    "dequantize",
    "frozen_block_linears",
    "is_nf4",
    "nf4_bytes",
    "nf4_keep_reason",
    "nf4_missing",
    "quantize_base",
    "quantize_linears",
    "round_trip",
    "shard_problem",
]
