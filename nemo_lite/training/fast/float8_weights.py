"""Float8 weights written by the optimizer: the fast step's swap for torchao's tensorwise ``Float8Linear``.

A ``Float8Linear`` (``float8.enabled=true``, :mod:`nemo_lite.training.converters.float8`) casts its float32
weight to float8 itself, twice per step: in forward, and again in backward for the input's gradient, each
cast a reduction to the tensor's absolute maximum and a pass that scales and rounds. The optimizer's
update already reads and writes every element of the weight, so the Triton AdamW kernel
(:mod:`nemo_lite.training.fast.adamw_kernel`, ``float8s``) produces the same float8 e4m3 tensor and scale
there, once per step, and :class:`Float8WeightLinear` hands that tensor to torchao's matmul, which uses an
operand that is already float8 as it is (``matmul_with_hp_or_float8_args``: the seam torchao's FSDP2
float8 all-gather uses).

The float8 weight is a leaf ``Float8TrainingTensor`` (torchao's) whose gradient arrives as bf16 in its
``.grad``; the kernel reads it there, as it reads a bf16 weight copy's (:mod:`.swaps`). The float32
weight stays the parameter, under its name: state dicts, checkpoints and exports do not change. Outside
autocast (a float32 input) the layer is torchao's own (it casts its float32 weight).

Only the recipe whose weight cast is one dynamic e4m3 scale per tensor, the same in forward and for the
input's gradient, qualifies: ``tensorwise``, in one process (under FSDP2 each rank holds a shard, and
torchao all-gathers the weights in float8 itself).
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.float8.config import ScalingGranularity, ScalingType
from torchao.float8.float8_linear import Float8Linear, matmul_with_hp_or_float8_args
from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic
from torchao.float8.float8_training_tensor import Float8TrainingTensor, GemmInputRole
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

from nemo_lite.training.converters.float8 import OWN_CAST

FLOAT8_DTYPE = torch.float8_e4m3fn


def takes_float8_weight(module: nn.Module) -> bool:
    """A ``Float8Linear`` (exact type) whose weight cast the optimizer can do: dynamic, tensorwise e4m3, the
    same cast for forward and for the input's gradient, unrounded scales, a trainable plain float32 weight."""
    if type(module) is not Float8Linear:
        return False
    config, weight = module.config, module.weight
    casts = (config.cast_config_weight, config.cast_config_weight_for_grad_input)
    return (
        all(
            c.scaling_type is ScalingType.DYNAMIC
            and c.scaling_granularity is ScalingGranularity.TENSORWISE
            and c.target_dtype == FLOAT8_DTYPE
            for c in casts
        )
        and not config.round_scales_to_power_of_2
        and not config.pad_inner_dim
        and not isinstance(weight.data, WeightWithDynamicFloat8CastTensor)
        and type(weight.data) is torch.Tensor  # not a DTensor shard
        and weight.dtype == torch.float32
        and weight.requires_grad
    )


def float8_weight(weight: torch.Tensor, linear_mm_config) -> Float8TrainingTensor:
    """An empty float8 weight for ``weight``: a leaf that collects its bf16 gradient (filled by :func:`cast_`)."""
    data = torch.empty(weight.shape, dtype=FLOAT8_DTYPE, device=weight.device)
    scale = torch.ones((), dtype=torch.float32, device=weight.device)
    out = Float8TrainingTensor(data, scale, torch.bfloat16, linear_mm_config, GemmInputRole.WEIGHT)
    return out.requires_grad_()


@torch.no_grad()
def cast_(weights: dict[torch.Tensor, Float8TrainingTensor]) -> None:
    """Cast each float32 parameter into its float8 weight with torchao's own dynamic tensorwise cast (after
    anything but an optimizer step changed the parameters)."""
    for param, f8 in weights.items():
        ref = hp_tensor_to_float8_dynamic(param.detach(), FLOAT8_DTYPE, f8._linear_mm_config)
        f8._data.copy_(ref._data)
        f8._scale.copy_(ref._scale)


class Float8WeightLinear(Float8Linear):
    """torchao's ``Float8Linear`` that, for a bf16 input (under autocast), multiplies by ``weight_float8``
    (written by the optimizer) instead of casting its float32 weight; its bf16 weight gradient lands on
    ``weight_float8.grad``. A float32 input takes torchao's own path (float32 weight gradient on ``.grad``)."""

    def __init__(self, linear: Float8Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        for name in ("scaling_type_input", "scaling_type_weight", "scaling_type_grad_output", "config"):
            setattr(self, name, getattr(linear, name))
        self.linear_mm_config = linear.linear_mm_config
        self.weight_float8 = float8_weight(linear.weight, linear.linear_mm_config)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cuda"):  # as torchao's Float8Linear casts its input
            input = input.to(torch.get_autocast_dtype("cuda"))
        if input.dtype != torch.bfloat16:  # a float32 input has a float32 weight gradient: torchao's own path
            return super().forward(input)
        output = matmul_with_hp_or_float8_args.apply(input, self.weight_float8.t(), self.linear_mm_config, self.config)
        if self.bias is not None:
            output = output + self.bias.to(output.dtype)
        return output


def casts_own_weight(module: nn.Module) -> bool:
    """The float8 converter marked the layer to keep its own cast (``float8.weights_from_optimizer=false``)."""
    return bool(getattr(module, OWN_CAST, False))


def swap_in_float8_weights(model: nn.Module) -> dict[torch.Tensor, Float8TrainingTensor]:
    """Replace every :func:`takes_float8_weight` layer (not marked by :func:`casts_own_weight`) by a
    :class:`Float8WeightLinear`. Returns ``{parameter: its float8 weight}`` (empty until the optimizer or
    :func:`cast_` fills them)."""
    out: dict[torch.Tensor, Float8TrainingTensor] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if takes_float8_weight(child) and not casts_own_weight(child):
                new = Float8WeightLinear(child)
                setattr(parent, name, new)
                out[new.weight] = new.weight_float8
    return out


def float8_weight_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The weights of the :func:`takes_float8_weight` layers: those :func:`swap_in_float8_weights` would take
    over, and those marked to keep their own cast."""
    layers = [m for m in model.modules() if takes_float8_weight(m)]
    return [m.weight for m in layers if not casts_own_weight(m)], [m.weight for m in layers if casts_own_weight(m)]
