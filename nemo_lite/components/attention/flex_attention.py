"""flex: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built once per step.

The public names follow the seed API: ``FlexAttention(attn_mask_type, fixed_block_size)``, its static
mask-mod builders, ``forward(q, k, v, scale, sink_weights, sliding_window, enable_gqa)``, the class-level
``init_attention_mask(batch, eos_id)`` and ``FLEX_ATTN_MASK_T``. Where the reference implementation
was wrong we do what its documentation promises: the block-causal mask is really built for packed
batches, fixed blocks read document ids at global positions, the sink path honours ``scale``, and the
step's masks replace the previous step's instead of accumulating per shape.

Devices:
- CUDA: ``flex_attention`` and ``create_block_mask`` are compiled once per process (class attributes).
- CPU: torch's flex has no backward there. With autograd in play the same mask function is evaluated
  densely (``create_mask``) and the float32 math path runs (warned once); without it (inference) the
  uncompiled flex kernel runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch.nn.attention.flex_attention import (
    BlockMask,
    _mask_mod_signature,
    and_masks,
    create_block_mask,
    create_mask,
    flex_attention,
)

from nemo_lite.components.attention.base import AttentionBackend, attention_math, check_qkv, warn_once
from nemo_lite.components.attention.masks import FLEX_ATTN_MASK_T, AttentionMask, document_ids
from nemo_lite.components.attention.registry import register_attention_backend

try:  # torch >= 2.9: the log-sum-exp is requested through AuxRequest; return_lse is deprecated
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

__all__ = ["FLEX_ATTN_MASK_T", "FlexAttention"]


@register_attention_backend("flex")
class FlexAttention(AttentionBackend):
    """FlexAttention module that uses ``torch.nn.attention.flex_attention``.

    Args:
        attn_mask_type: "causal" (lower triangle) or "block_causal" (documents delimited by EOS,
            causal within each document).
        fixed_block_size: if set, each sequence is further cut into blocks of this many tokens and a
            query attends only to keys in its own block.
    """

    # Mask types of every FlexAttention built in this process; init_attention_mask builds one mask each.
    used_attn_mask_types: ClassVar[set[tuple[str, int | None]]] = set()
    # The current step's masks (seed API), replaced by every init_attention_mask call.
    block_masks: ClassVar[dict[FLEX_ATTN_MASK_T, BlockMask]] = {}
    _step_masks: ClassVar[dict[tuple[str, int | None], AttentionMask]] = {}
    # Triton kernel options for every flex call in this process (block sizes, warps, stages; torch's
    # ``kernel_options``); None keeps torch's defaults for the card. The trainer sets them from
    # ``tuned_kernel_options`` (attention.flex_kernel_options=auto). See docs/benchmarks.md for measurements.
    kernel_options: ClassVar[dict | None] = None
    # Compiled once per process, on first use on a GPU.
    _compiled_flex: ClassVar[Callable | None] = None
    _compiled_create_block_mask: ClassVar[Callable | None] = None

    def __init__(self, attn_mask_type: str = "causal", fixed_block_size: int | None = None) -> None:
        super().__init__(attn_mask_type, fixed_block_size)
        FlexAttention.used_attn_mask_types.add((attn_mask_type, fixed_block_size))

    # ---- mask mods (seed API) -------------------------------------------------------------
    @staticmethod
    def _get_causal_mask_mod() -> _mask_mod_signature:
        def causal_mask(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        return causal_mask

    @staticmethod
    def _get_block_causal_mask_mod(batch: torch.Tensor, eos_id: int) -> _mask_mod_signature:
        return _block_causal_from_doc_ids(document_ids(batch, eos_id))

    @staticmethod
    def _get_sliding_window_mask_mod(window: int) -> _mask_mod_signature:
        """Causal, and only if ``q_idx - kv_idx <= window``."""

        def sliding_window_mask(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx <= window)

        return sliding_window_mask

    @staticmethod
    def _fixed_block_mask_mod(mask_mod: _mask_mod_signature, fixed_block_size: int) -> _mask_mod_signature:
        """Allow attention only within blocks of ``fixed_block_size`` tokens, on top of ``mask_mod``.

        ``mask_mod`` is evaluated at the global positions, so document ids are read where the tokens are.
        """

        def fixed_block_mask(b, h, q_idx, kv_idx):
            same_block = (q_idx // fixed_block_size) == (kv_idx // fixed_block_size)
            return same_block & mask_mod(b, h, q_idx, kv_idx)

        return fixed_block_mask

    # ---- per step -------------------------------------------------------------------------
    def _mask_mod(self, mask: AttentionMask, sliding_window: int) -> _mask_mod_signature:
        if mask.doc_ids is not None:
            mask_mod = _block_causal_from_doc_ids(mask.doc_ids)
            if sliding_window > 0:
                mask_mod = and_masks(mask_mod, self._get_sliding_window_mask_mod(sliding_window))
        elif sliding_window > 0:
            mask_mod = self._get_sliding_window_mask_mod(sliding_window)
        else:
            mask_mod = self._get_causal_mask_mod()
        if mask.fixed_block_size:
            mask_mod = self._fixed_block_mask_mod(mask_mod, mask.fixed_block_size)
        return mask_mod

    def _build_one(self, mask: AttentionMask, sliding_window: int) -> BlockMask:
        mask_mod = self._mask_mod(mask, sliding_window)
        batch = mask.batch_size if mask.doc_ids is not None else None  # causal masks broadcast over B
        build = create_block_mask
        if mask.device.type == "cuda":
            if FlexAttention._compiled_create_block_mask is None:
                FlexAttention._compiled_create_block_mask = torch.compile(create_block_mask)
            build = FlexAttention._compiled_create_block_mask
        return build(mask_mod, batch, None, mask.seq_len, mask.seq_len, device=mask.device)

    @classmethod
    def init_attention_mask(
        cls, batch: torch.Tensor, eos_id: int | None, sliding_windows: Iterable[int] = (0,)
    ) -> dict[FLEX_ATTN_MASK_T, BlockMask]:
        """Build this step's masks for every mask type in use, on the batch's device.

        Shared by every layer: ``forward`` without ``attention_mask`` reads them. The previous step's
        masks are dropped, not accumulated. Returns the ``BlockMask`` of each key.
        """
        step_masks = {}
        for attn_mask_type, fixed_block_size in sorted(cls.used_attn_mask_types, key=str):
            builder = cls.__new__(cls)  # a mask builder without registering another mask type
            AttentionBackend.__init__(builder, attn_mask_type, fixed_block_size)
            step_masks[(attn_mask_type, fixed_block_size)] = builder.build_mask(batch, eos_id, sliding_windows)
        cls._step_masks = step_masks
        cls.block_masks = {key: bm for m in step_masks.values() for key, bm in m.masks.items()}
        return cls.block_masks

    # ---- forward ----------------------------------------------------------------------------
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        sink_weights: torch.Tensor | None = None,
        sliding_window: int = 0,
        enable_gqa: bool = False,
        attention_mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        groups = check_qkv(q, k, v, enable_gqa, sink_weights)
        if attention_mask is None:
            attention_mask = FlexAttention._step_masks.get((self.attn_mask_type, self.fixed_block_size))
        block_mask = self._mask_for(attention_mask, q, sliding_window)

        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink_weights))
        if q.device.type == "cpu" and needs_grad:
            warn_once(
                "flex-cpu-backward",
                "flex_attention has no backward on CPU: evaluating the same mask densely on the math path "
                "(correct but O(S^2) memory; use a GPU for speed)",
            )
            allowed = self._dense(attention_mask, block_mask, sliding_window, q)
            return attention_math(q, k, v, allowed, scale=scale, sink_weights=sink_weights, enable_gqa=enable_gqa)

        if q.device.type == "cpu":
            # torch refuses inputs that require grad even under no_grad; and CPU inference runs torch's
            # unfused flex on purpose (there is no fused CPU kernel worth compiling here), so its
            # "called without torch.compile" warning is noise.
            q, k, v = q.detach(), k.detach(), v.detach()
            sink_weights = None if sink_weights is None else sink_weights.detach()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return _flex(flex_attention, q, k, v, block_mask, scale, sink_weights, groups > 1)
        kernel = flex_attention  # inside a compiled block dynamo captures it as it is
        if q.device.type == "cuda" and not torch.compiler.is_compiling():
            if FlexAttention._compiled_flex is None:
                FlexAttention._compiled_flex = torch.compile(flex_attention, dynamic=False)
            kernel = FlexAttention._compiled_flex
        return _flex(kernel, q, k, v, block_mask, scale, sink_weights, groups > 1)

    def _dense(self, attention_mask: AttentionMask | None, block_mask: BlockMask, window: int, q) -> torch.Tensor:
        """The step's BlockMask evaluated densely (its own mask_mod), kept for the step."""
        b, _, s, _ = q.shape

        def build():
            batch = b if block_mask.shape[0] != 1 else 1
            return create_mask(block_mask.mask_mod, batch, 1, s, s, device=q.device)

        if attention_mask is None:  # causal without a step mask: nothing to keep it in
            return build()
        key = ("dense", attention_mask.key(window))
        if key not in attention_mask.masks:
            attention_mask.masks[key] = build()
        return attention_mask.masks[key]


# Kernel options measured faster than torch's defaults in training, by (CUDA compute capability major,
# head_dim). Hopper, head_dim 64 (Llama-3.2-1B): the forward and backward configurations inductor's
# autotuning picked; flex fwd+bwd 17.7 -> 14.7 ms a step on an H100 (docs/benchmarks.md, item 17).
TUNED_KERNEL_OPTIONS: dict[tuple[int, int], dict[str, int]] = {
    (9, 64): {
        "fwd_BLOCK_M": 128,
        "fwd_BLOCK_N": 64,
        "fwd_num_warps": 4,
        "fwd_num_stages": 3,
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 64,
        "bwd_num_warps": 4,
        "bwd_num_stages": 4,
    },
}


def tuned_kernel_options(device: torch.device | str, head_dim: int) -> dict[str, int] | None:
    """nemo_lite's measured kernel options for this GPU and head_dim, or None (torch's defaults)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    options = TUNED_KERNEL_OPTIONS.get((major, head_dim))
    return dict(options) if options is not None else None


def _block_causal_from_doc_ids(doc_ids_BS: torch.Tensor) -> _mask_mod_signature:
    def block_causal_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids_BS[b, q_idx] == doc_ids_BS[b, kv_idx])

    return block_causal_mask


def _flex(kernel, q, k, v, block_mask, scale, sink_weights, enable_gqa) -> torch.Tensor:
    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": enable_gqa}
    if FlexAttention.kernel_options and q.device.type == "cuda":
        kwargs["kernel_options"] = dict(FlexAttention.kernel_options)
    if sink_weights is None:
        return kernel(q, k, v, **kwargs)
    if AuxRequest is not None:
        out, aux = kernel(q, k, v, **kwargs, return_aux=AuxRequest(lse=True))
        lse_BHS = aux.lse
    else:
        out, lse_BHS = kernel(q, k, v, **kwargs, return_lse=True)
    # softmax over [scores, w_h] = softmax(scores) * sigmoid(lse - w_h): the sink takes mass, adds no value
    gate_BHS1 = torch.sigmoid(lse_BHS.float() - sink_weights.float().view(1, -1, 1)).unsqueeze(-1)
    return (out.float() * gate_BHS1).to(q.dtype)
