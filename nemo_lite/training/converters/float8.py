"""Float8 training linears through torchao (``float8.enabled=true``; docs/float8.md).

:class:`Float8Converter` swaps the decoder blocks' ``nn.Linear`` layers for torchao's ``Float8Linear``:
each matrix multiplication of forward and backward casts its two operands to float8 (e4m3 in forward,
e5m2 for the output gradient under ``tensorwise``) with scales computed from the current values, and runs
on the GPU's float8 tensor cores, which have twice the bf16 peak. The float32 master weights stay the
parameters (a ``Float8Linear`` reads its float32 weight and casts it itself), so parameter names, state
dicts, checkpoints and the Hugging Face export are those of the plain model.

Which linears are converted (:func:`float8_keep_reason`): only the decoder blocks' layers, never the output
projection (its logits feed the loss directly, and the vocabulary projection is where float8's error would
show first), never an adapter's small matrices, and of the blocks' layers only those torchao's kernels can
take (both dimensions multiples of 16) and large enough to gain (the casts and the scale reductions cost
memory traffic that a small matrix multiplication does not repay). The size thresholds are those torchao
measured on H100 for each recipe (its ``float8`` README's performance tables, which its own
auto-filter uses).

Recipes (torchao's names): ``tensorwise`` (one scale per tensor; the fastest; with FSDP2 the weights are
all-gathered in float8) and ``rowwise`` (one scale per row: more precise, slower casts, so larger
thresholds).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nemo_lite.errors import ConfigError
from nemo_lite.training.converters.base import ModelConverter, register_converter

# Each recipe's test for a linear too small to gain: (out_features, in_features) -> kept in high precision.
_TOO_SMALL = {
    "tensorwise": lambda out_f, in_f: in_f <= 4096 and out_f <= 1024,
    "rowwise": lambda out_f, in_f: out_f <= 2048 or in_f <= 1024 or (out_f <= 4096 and in_f <= 2048),
}
FLOAT8_RECIPES = tuple(_TOO_SMALL)
INSTALL_HINT = "pip install 'nemo_lite[float8]'"
# The first GPUs with float8 tensor cores: Ada (8.9) and Hopper (9.0).
MIN_CAPABILITY = (8, 9)
# Set on the converted layers with float8.weights_from_optimizer=false: the fast step leaves them as they are
# (nemo_lite.training.fast.float8_weights).
OWN_CAST = "nemo_lite_casts_own_weight"


def float8_keep_reason(out_features: int, in_features: int, recipe: str) -> str | None:
    """Why a decoder linear with a weight of shape (out_features, in_features) stays in high precision under
    ``recipe`` (None: it is converted to float8).

    - Both dimensions must be multiples of 16 (the float8 matmul's alignment).
    - ``tensorwise``: kept when in_features <= 4096 and out_features <= 1024.
    - ``rowwise``: kept when out_features <= 2048, or in_features <= 1024, or both out_features <= 4096 and
      in_features <= 2048.

    The thresholds are torchao's H100 measurements of where a float8 linear (casts included) stops beating
    bf16, for 16384 tokens per step or more."""
    if out_features % 16 or in_features % 16:
        return "not multiples of 16"
    return "too small to gain" if _TOO_SMALL[recipe](out_features, in_features) else None


@dataclass
class Float8Section:
    """The ``float8:`` config section."""

    # Float8 training linears through torchao (pip install nemo_lite[float8]; a Hopper GPU or newer).
    enabled: bool = False
    # torchao's scaling recipe: tensorwise | rowwise.
    recipe: str = "tensorwise"
    # tensorwise under the fast step on one GPU: the AdamW kernel writes each converted weight's float8 copy
    # and scale, and the layers multiply by it instead of casting their weights in forward and backward.
    # false: every layer casts its own weight (torchao's way).
    weights_from_optimizer: bool = True


def float8_missing(device: torch.device) -> str | None:
    """What float8 training lacks on ``device`` (None: it can run), as the end of a one-line refusal."""
    if importlib.util.find_spec("torchao") is None:
        return f"torchao, which is not installed: {INSTALL_HINT}"
    if device.type != "cuda":
        return f"a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later); this run is on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (
            f"a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later); {name} has "
            f"{capability[0]}.{capability[1]}: leave float8.enabled=false"
        )
    return None


def _adapter_linears(model: nn.Module) -> set[int]:
    """The ids of the linears that belong to PEFT adapters (LoRA's A and B): never converted. The adapted
    layer's own base linear is not among them."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    out: set[int] = set()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            base = module.get_base_layer()
            out |= {id(m) for m in module.modules() if isinstance(m, nn.Linear) and m is not base}
    return out


def _distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


@register_converter("float8")
class Float8Converter(ModelConverter):
    """Swap the decoder's large linears for torchao's ``Float8Linear`` (``float8`` config section).

    ``emulate`` is torchao's emulation (float8 rounding, high-precision matmuls) so that tests run the
    wiring on a CPU; it is not reachable from the config, because it is slower than bf16 and saves nothing.
    """

    order = 20  # after the adapters: their own small matrices stay in high precision

    def __init__(self, section: Float8Section, *, emulate: bool = False) -> None:
        self.check_section(section)
        self.recipe = section.recipe
        self.weights_from_optimizer = bool(getattr(section, "weights_from_optimizer", True))
        self.emulate = emulate
        self.description = f"float8 ({self.recipe}): not applied yet"
        # After convert(): the names inside a block of the converted linears (-> in how many blocks), and
        # of the kept ones (-> why), the model's own names for linears outside the blocks.
        self.converted: dict[str, int] = {}
        self.kept: dict[str, str] = {}
        self.adapter_linears = 0  # PEFT's adapter matrices, never converted

    @classmethod
    def enabled(cls, section: Float8Section) -> bool:
        return bool(section.enabled)

    @staticmethod
    def check_section(section: Float8Section) -> None:
        if section.recipe not in FLOAT8_RECIPES:
            raise ConfigError(
                f"float8.recipe={section.recipe!r} is not valid; choose one of: {', '.join(FLOAT8_RECIPES)}"
            )

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        cls.check_section(cfg.float8)

    @classmethod
    def from_config(cls, cfg: Any, *, autocast_dtype: torch.dtype | None, pretrained_dir: Path | None):
        return cls(cfg.float8)

    def _config(self):
        from torchao.float8 import Float8LinearConfig

        config = Float8LinearConfig.from_recipe_name(self.recipe)
        # Under FSDP2, tensorwise weights are all-gathered already cast to float8 (half the bytes of bf16);
        # torchao supports this for tensorwise scaling only. Each converted weight computes its own scale
        # in the all-gather's pre-hook; torchao's precompute_float8_dynamic_scale_for_fsdp (one all-reduce
        # for all of them after the optimizer step) is an optimization this converter does not need.
        fsdp_float8 = self.recipe == "tensorwise" and _distributed()
        return dataclasses.replace(config, enable_fsdp_float8_all_gather=fsdp_float8, emulate=self.emulate)

    def convert(self, model: nn.Module, family: Any) -> None:
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(f"float8.enabled=true needs torchao, which is not installed: {INSTALL_HINT}")
        missing = None if self.emulate else float8_missing(next(model.parameters()).device)
        if missing:
            raise ConfigError(f"float8.enabled=true needs {missing}")
        from torchao.float8 import convert_to_float8_training

        adapters = _adapter_linears(model)
        blocks = list(family.blocks(model))
        chosen: set[int] = set()
        self.converted, self.kept, self.adapter_linears = {}, {}, 0
        in_blocks: set[int] = set()
        for block in blocks:
            for name, module in block.named_modules():
                in_blocks.add(id(module))
                if type(module) is not nn.Linear:  # a Float8Linear already, or another subclass: not ours
                    continue
                if id(module) in adapters:
                    self.adapter_linears += 1
                    continue
                out_features, in_features = module.weight.shape
                reason = float8_keep_reason(out_features, in_features, self.recipe)
                if reason:
                    self.kept.setdefault(name, f"{reason}, {out_features}x{in_features}")
                else:
                    chosen.add(id(module))
                    self.converted[name] = self.converted.get(name, 0) + 1
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and id(module) not in in_blocks:
                self.kept[name] = "outside the decoder blocks"
        config = self._config()
        convert_to_float8_training(model, module_filter_fn=lambda m, fqn: id(m) in chosen, config=config)
        if not self.weights_from_optimizer:  # the fast step leaves these layers to cast their own weights
            for module in model.modules():
                if type(module).__name__ == "Float8Linear":
                    setattr(module, OWN_CAST, True)
        self.description = self._describe(len(blocks), config.enable_fsdp_float8_all_gather)

    def _describe(self, n_blocks: int, fsdp_float8: bool) -> str:
        converted = ", ".join(f"{name} ({n}/{n_blocks} blocks)" for name, n in self.converted.items())
        small = [f"{name} ({why})" for name, why in self.kept.items() if why != "outside the decoder blocks"]
        adapters = [f"{self.adapter_linears} adapter linears"] if self.adapter_linears else []
        text = f"float8 ({self.recipe}{', emulated' if self.emulate else ''}): converted {converted or 'no linear'}"
        text += "; kept in high precision: " + ", ".join([*small, *adapters, "the output projection"])
        if fsdp_float8:
            text += "; FSDP2 all-gathers the converted weights in float8"
        return text
