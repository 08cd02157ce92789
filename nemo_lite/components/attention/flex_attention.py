"""flex: ``torch.nn.attention.flex_attention`` with a ``BlockMask`` built once per step.

The public names follow the seed API: ``FlexAttention(attn_mask_type, fixed_block_size)``, its static
mask-mod builders, ``forward(q, k, v, scale, sink_weights, sliding_window, enable_gqa)``, the class-level
``init_attention_mask(batch, eos_id)`` and ``FLEX_ATTN_MASK_T``. Where the reference implementation
was wrong we do what its documentation promises: the block-causal mask is really built for packed
batches, fixed blocks read document ids at global positions, the sink path honours ``scale``, and the
step's masks replace the previous step's instead of accumulating per shape.

The class-level state (``used_attn_mask_types``, ``block_masks``) serves only that seed path. The
training path (``build_mask`` once per step, ``attention_mask=`` in every layer) reads nothing from the
class: each instance carries its own ``kernel_options``, and the compiled kernels are process-wide caches.

Devices:
- CUDA: ``flex_attention`` and ``create_block_mask`` are compiled once per process.
- CPU: torch's flex has no backward there. With autograd in play the same mask function is evaluated
  densely (``create_mask``, once per step) and ``scaled_dot_product_attention`` runs with it (the math
  path when there are sinks, which sdpa cannot take); without autograd (inference) torch's
  uncompiled flex kernel runs.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import (
    BlockMask,
    _mask_mod_signature,
    and_masks,
    create_block_mask,
    create_mask,
    flex_attention,
)

from nemo_lite.components.attention.base import AttentionBackend, AttentionConfigError, attention_math, check_qkv
from nemo_lite.components.attention.masks import (
    FLEX_ATTN_MASK_T,
    AttentionMask,
    Branches,
    document_ids,
    shared_prompt_allowed,
)
from nemo_lite.components.attention.registry import register_attention_backend

try:  # torch >= 2.9: the log-sum-exp is requested through AuxRequest; return_lse is deprecated
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover - older torch
    AuxRequest = None

__all__ = ["FLEX_ATTN_MASK_T", "KERNEL_OPTIONS_CHOICES", "FlexAttention", "tuned_kernel_options"]

# flex's kernel_options option: "auto" (nemo_lite's measured tiles where it has some, else torch's),
# "torch" (torch's defaults), or a dict passed to flex_attention as it is.
KERNEL_OPTIONS_CHOICES = ("auto", "torch")

# Blocks of a BlockMask: on GPU a seq_len that is not a multiple of this makes shapes ragged.
BLOCK_SIZE = 128


@functools.cache
def compiled_flex_attention() -> Callable:
    """``flex_attention`` compiled once per process (static shapes, so the kernel does not recompile)."""
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def compiled_create_block_mask() -> Callable:
    """``create_block_mask`` compiled once per process (uncompiled, it runs many small kernels every step)."""
    return torch.compile(create_block_mask)


@register_attention_backend("flex")
class FlexAttention(AttentionBackend):
    """FlexAttention module that uses ``torch.nn.attention.flex_attention``.

    Args:
        attn_mask_type: "causal" (lower triangle) or "block_causal" (documents delimited by EOS,
            causal within each document).
        fixed_block_size: if set, each sequence is further cut into blocks of this many tokens and a
            query attends only to keys in its own block.
        kernel_options: the Triton tiles of the GPU kernels (a speed choice; the result is the same).
            "auto": nemo_lite's measured ones where ``TUNED_KERNEL_OPTIONS`` has the card and head_dim,
            looked up at each CUDA forward, else torch's; "torch": torch's defaults; a dict: passed
            to ``flex_attention(kernel_options=...)`` as it is.
    """

    # Mask types of every FlexAttention built in this process; init_attention_mask builds one mask each.
    used_attn_mask_types: ClassVar[set[tuple[str, int | None]]] = set()
    # The current step's masks (seed API), replaced by every init_attention_mask call.
    block_masks: ClassVar[dict[FLEX_ATTN_MASK_T, BlockMask]] = {}
    _step_masks: ClassVar[dict[tuple[str, int | None], AttentionMask]] = {}

    def __init__(
        self,
        attn_mask_type: str = "causal",
        fixed_block_size: int | None = None,
        *,
        kernel_options: str | Mapping[str, Any] = "auto",
    ) -> None:
        super().__init__(attn_mask_type, fixed_block_size)
        self.kernel_options = _checked_kernel_options(kernel_options)
        FlexAttention.used_attn_mask_types.add((attn_mask_type, fixed_block_size))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_options={self.kernel_options!r}"

    # ---- configuration ------------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> None:
        super().check_options(options)
        if options and "kernel_options" in options:
            _checked_kernel_options(options["kernel_options"])

    @classmethod
    def check_run(cls, *, seq_len: int, device_type: str, options: Mapping[str, Any] | None = None) -> None:
        super().check_run(seq_len=seq_len, device_type=device_type, options=options)
        if device_type == "cuda" and seq_len % BLOCK_SIZE:
            up = BLOCK_SIZE * -(-seq_len // BLOCK_SIZE)
            raise AttentionConfigError(
                f"attention=flex on GPU needs data.seq_len to be a multiple of {BLOCK_SIZE} (its BlockMask block "
                f"size) so shapes stay static; got {seq_len}: use data.seq_len={up}, or another backend"
            )

    def describe(self, device_type: str) -> str:
        if device_type == "cuda":
            if isinstance(self.kernel_options, dict):
                tiles = "the given kernel_options"
            elif self.kernel_options == "auto":
                tiles = "nemo_lite's tuned tiles where measured for the card and head_dim, else torch's"
            else:
                tiles = "torch's default tiles"
            return f"flex: compiled flex_attention with a BlockMask per step; {tiles}"
        return (
            f"flex: training runs sdpa on the same mask, densely (no flex backward on {device_type}); "
            "inference runs torch's flex kernel"
        )

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
        if mask.branches is not None:
            return _shared_prompt_mask_mod(mask.doc_ids, mask.branches, sliding_window)
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
        build = create_block_mask  # inside a compiled region dynamo captures it as it is
        if mask.device.type == "cuda" and not torch.compiler.is_compiling():
            build = compiled_create_block_mask()
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
        if attention_mask is None:  # the seed path: the masks init_attention_mask stored for this step
            attention_mask = FlexAttention._step_masks.get((self.attn_mask_type, self.fixed_block_size))
            if attention_mask is not None:
                _check_stored_mask_fits(attention_mask, q)
        block_mask = self._mask_for(attention_mask, q, sliding_window)

        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sink_weights))
        if q.device.type == "cpu" and needs_grad:
            allowed = self._dense(attention_mask, block_mask, sliding_window, q)
            if sink_weights is not None:  # sdpa has no sink logit
                return attention_math(q, k, v, allowed, scale=scale, sink_weights=sink_weights, enable_gqa=enable_gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=groups > 1)

        if q.device.type == "cpu":
            # torch refuses inputs that require grad even under no_grad; and CPU inference runs torch's
            # unfused flex on purpose (there is no fused CPU kernel worth compiling here), so its
            # "called without torch.compile" warning is noise.
            q, k, v = q.detach(), k.detach(), v.detach()
            sink_weights = None if sink_weights is None else sink_weights.detach()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                return _flex(flex_attention, q, k, v, block_mask, scale, sink_weights, groups > 1, None)
        kernel = flex_attention  # inside a compiled block dynamo captures it as it is
        if q.device.type == "cuda" and not torch.compiler.is_compiling():
            kernel = compiled_flex_attention()
        kernel_options = self._kernel_options_for(q) if q.device.type == "cuda" else None
        return _flex(kernel, q, k, v, block_mask, scale, sink_weights, groups > 1, kernel_options)

    def _kernel_options_for(self, q: torch.Tensor) -> dict[str, Any] | None:
        """This instance's Triton options for q's device and head_dim (None: torch's defaults). Looked up on
        every call rather than cached on the instance: a forward that writes to the module is a side effect
        that dynamo cannot keep inside activation checkpointing, and it would run the whole checkpointed block
        uncompiled (the lookup itself folds to a constant when compiled)."""
        if isinstance(self.kernel_options, dict):
            return self.kernel_options
        if self.kernel_options == "torch":
            return None
        return tuned_kernel_options(q.device, q.shape[-1])

    def _add_window(self, mask: AttentionMask, sliding_window: int) -> None:
        """As the base class; on a CPU with autograd on (training), the window's mask is also evaluated densely
        for the sdpa path that trains there, with the step's masks rather than in the first layer's forward: a
        forward that writes into the step's masks cannot be compiled inside activation checkpointing."""
        super()._add_window(mask, sliding_window)
        if mask.device.type == "cpu" and torch.is_grad_enabled():
            key = mask.key(sliding_window)
            mask.masks[("dense", key)] = _evaluate(mask.masks[key], mask.batch_size, mask.seq_len, mask.device)

    def _dense(self, attention_mask: AttentionMask | None, block_mask: BlockMask, window: int, q) -> torch.Tensor:
        """The step's BlockMask evaluated densely (its own mask_mod): the one build_mask kept, else built now
        (and kept for the step)."""
        if attention_mask is None:  # causal without a step mask: nothing to keep it in
            return _evaluate(block_mask, q.shape[0], q.shape[-2], q.device)
        key = ("dense", attention_mask.key(window))
        if key not in attention_mask.masks:
            attention_mask.masks[key] = _evaluate(block_mask, q.shape[0], q.shape[-2], q.device)
        return attention_mask.masks[key]


def _evaluate(block_mask: BlockMask, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``block_mask``'s mask_mod evaluated at every (query, key) pair: a [B or 1, 1, S, S] boolean mask."""
    rows = batch if block_mask.shape[0] != 1 else 1
    return create_mask(block_mask.mask_mod, rows, 1, seq_len, seq_len, device=device)


def _check_stored_mask_fits(mask: AttentionMask, q: torch.Tensor) -> None:
    """The stored step mask describes one batch's documents; another batch would read the wrong ones."""
    if (mask.batch_size, mask.seq_len) != (q.shape[0], q.shape[-2]):
        raise ValueError(
            f"the mask stored by FlexAttention.init_attention_mask is for a batch of shape "
            f"[{mask.batch_size}, {mask.seq_len}] but q has batch {q.shape[0]} and seq_len {q.shape[-2]}: "
            "call FlexAttention.init_attention_mask(batch, eos_id) with this batch, or pass attention_mask="
        )


def _checked_kernel_options(value: Any) -> str | dict[str, Any]:
    """``value`` as FlexAttention keeps it ("auto", "torch" or a dict), or one line saying what is valid."""
    if isinstance(value, Mapping) and all(isinstance(key, str) for key in value):
        return dict(value)
    if isinstance(value, str) and value in KERNEL_OPTIONS_CHOICES:
        return value
    raise AttentionConfigError(
        f"attention=flex option kernel_options={value!r} is not valid; choose one of: "
        f"{', '.join(KERNEL_OPTIONS_CHOICES)}, or a dict of flex_attention kernel_options"
    )


# Kernel options measured faster than torch's defaults in training, by (CUDA compute capability major,
# head_dim). Hopper, head_dim 64 (Llama-3.2-1B): the forward and backward configurations inductor's
# autotuning picked (scripts/bench_flex_options.py measures them against the defaults).
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
    # get_device_properties, not get_device_capability: dynamo folds it to a constant inside a compiled model.
    major = torch.cuda.get_device_properties(device).major
    options = TUNED_KERNEL_OPTIONS.get((major, head_dim))
    return dict(options) if options is not None else None


def _block_causal_from_doc_ids(doc_ids_BS: torch.Tensor) -> _mask_mod_signature:
    def block_causal_mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids_BS[b, q_idx] == doc_ids_BS[b, kv_idx])

    return block_causal_mask


def _shared_prompt_mask_mod(doc_ids_BS: torch.Tensor, branches: Branches, window: int) -> _mask_mod_signature:
    """block_causal, and a branch sees only its own tokens and the trunk below its fork (masks.py)."""
    positions = branches.positions

    def shared_prompt_mask(b, h, q_idx, kv_idx):
        allowed = (q_idx >= kv_idx) & (doc_ids_BS[b, q_idx] == doc_ids_BS[b, kv_idx])
        allowed = allowed & shared_prompt_allowed(branches, q_idx, kv_idx, b)
        if window > 0:
            allowed = allowed & (positions[b, q_idx] - positions[b, kv_idx] <= window)
        return allowed

    return shared_prompt_mask


def _flex(kernel, q, k, v, block_mask, scale, sink_weights, enable_gqa, kernel_options) -> torch.Tensor:
    kwargs = {"block_mask": block_mask, "scale": scale, "enable_gqa": enable_gqa}
    if kernel_options:
        kwargs["kernel_options"] = dict(kernel_options)
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
