"""Activation checkpointing of the decoder blocks (``trainer.activation_checkpointing``): ``none``, ``full``
(each block's forward is recomputed in backward; only its input is kept) or ``selective`` (per operator, as
torchtitan's "op" selective checkpointing: the outputs of the expensive operators are kept, everything
else in the block is recomputed in backward).

What ``selective`` keeps (:func:`selective_policy`), per block and forward:

- the output of attention (SDPA's fused kernels, flex attention): the costliest operator to recompute;
- the output of every other matrix multiplication, the 1st, 3rd, 5th, ... (in a Llama block q, v, gate
  and down are kept, k, o and up recomputed): half the linears' recompute for half their memory;
- ``max`` reductions (float8's amax: tiny, and recomputing them would redo a full pass over a tensor).

Norms, rotary, activations, casts and the other matmuls are recomputed from what is kept. Recomputation
replays the same operators on the same values, so gradients are those of a run without checkpointing.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nemo_lite.errors import ConfigError

AC_MODES = ("none", "full", "selective")
_BOOLEANS = {"true": "full", "false": "none"}  # the key was a boolean: true meant full


def _ops(*names: str) -> set:
    """The aten overloads among ``names`` that this torch has (the fused attention kernels vary by build)."""
    found = set()
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload):
            found.add(getattr(op, overload))
    return found


MATMULS = _ops("mm.default", "addmm.default", "_scaled_mm.default")
ATTENTION = _ops(
    "_scaled_dot_product_flash_attention.default",
    "_scaled_dot_product_flash_attention_for_cpu.default",
    "_scaled_dot_product_efficient_attention.default",
    "_scaled_dot_product_cudnn_attention.default",
)
_flex = getattr(torch.ops.higher_order, "flex_attention", None)
if _flex is not None:
    ATTENTION.add(_flex)
ALWAYS_SAVED = ATTENTION | _ops("max.default")


def ac_mode(value: object) -> str:
    """``trainer.activation_checkpointing`` as one of :data:`AC_MODES` (true and false, the key's old
    boolean values, mean ``full`` and ``none``)."""
    text = str(value).lower() if isinstance(value, bool | str) else value
    mode = _BOOLEANS.get(text, text) if isinstance(text, str) else text
    if mode not in AC_MODES:
        raise ConfigError(
            f"trainer.activation_checkpointing={value!r} is not valid; choose one of: {', '.join(AC_MODES)}"
        )
    return mode


def selective_policy():
    """A fresh policy for one checkpointed forward (and its recompute): what to keep, as the module docstring
    says. The matmuls are counted separately in forward and in recompute, so both make the same choices."""
    counts: dict[bool, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in MATMULS:
            counts[ctx.is_recompute] += 1
            keep = counts[ctx.is_recompute] % 2 == 1
        else:
            keep = func in ALWAYS_SAVED
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def selective_contexts():
    """torch.utils.checkpoint's ``context_fn`` for ``selective``."""
    return create_selective_checkpoint_contexts(selective_policy())


def checkpoint_blocks(blocks, mode: str = "full") -> None:
    """Checkpoint each block's forward (``full`` or ``selective``; ``none`` leaves them). Wraps ``forward``
    in place, so parameter names stay."""
    if ac_mode(mode) == "none":
        return
    extra = {"context_fn": selective_contexts} if mode == "selective" else {}
    for block in blocks:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **extra, **kwargs)

        block.forward = forward
