"""varlen: FlashAttention over ``cu_seqlens`` (``torch.nn.attention.varlen.varlen_attn``).

The batch is flattened to ``[B*S, H, D]`` and cut into independent causal segments: every row start,
every document start (the token after an EOS) and, with ``fixed_block_size n``, every multiple of
``n``. A sliding window becomes ``window_size=(w, 0)``. So the step's "mask" is the int32
``cu_seqlens`` and the longest segment, built once per step on the ids' device.

Building costs one host sync per step (not per layer): the number of segments and the longest one
are data-dependent and the kernel takes them as host integers. The option ``host_sync=False``
(``attention.options.host_sync=false``) avoids it with a fixed-length ``cu_seqlens`` padded with empty
segments.

``varlen_attn``'s signature moved between releases: torch 2.10 had ``is_causal``; 2.11 added
``window_size``; 2.12 added ``enable_gqa``. We use ``window_size`` (so torch >= 2.11 on GPU) and
pass ``enable_gqa`` where it exists, otherwise expand the KV heads. Where the kernel cannot run (CPU,
float32, torch without varlen) the same segments are evaluated densely on the math path; ``describe``
says which one a run gets.
Sinks are not supported by the kernel: a clear error names the backends that have them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nemo_lite.components.attention.base import AttentionBackend, AttentionConfigError, attention_math, check_qkv
from nemo_lite.components.attention.masks import AttentionMask, segment_starts
from nemo_lite.components.attention.registry import (
    get_attention_backend,
    list_attention_backends,
    register_attention_backend,
)

try:
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
except ImportError:  # torch < 2.10
    varlen_attn = None
    _VARLEN_PARAMS = set()


@dataclass
class VarlenMask:
    """Segments of the flattened batch: ``cu_seqlens[i]:cu_seqlens[i+1]`` is one causal segment."""

    cu_seqlens: torch.Tensor  # [num_segments + 1] int32, on the ids' device
    max_seqlen: int
    segment_ids: torch.Tensor  # [B, S] int32: segment of every token (for the dense fallback)
    sliding_window: int


def build_cu_seqlens(mask: AttentionMask, host_sync: bool = True) -> tuple[torch.Tensor, int, torch.Tensor]:
    """``cu_seqlens`` (int32), the longest segment (host int) and per-token segment ids.

    ``host_sync=True``: exactly the segments, and the true longest one (one device-to-host sync).
    ``host_sync=False``: no sync; ``cu_seqlens`` has a fixed length ``B*S + 1`` (the unused tail repeats
    ``B*S``: empty segments) and the longest segment is bounded by the row length (or the fixed block).
    """
    starts_BS = segment_starts(mask)
    flat = starts_BS.reshape(-1)
    total = flat.numel()
    segment_ids = (torch.cumsum(flat.to(torch.int32), 0, dtype=torch.int32) - 1).view_as(starts_BS)
    if host_sync:
        start_idx = torch.nonzero(flat).flatten().to(torch.int32)  # the step's one host sync
        cu_seqlens = torch.cat([start_idx, start_idx.new_tensor([total])])
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
        return cu_seqlens, max_seqlen, segment_ids
    position = torch.arange(total, device=flat.device, dtype=torch.int32)
    start_or_end = torch.where(flat, position, torch.full_like(position, total))
    cu_seqlens = torch.cat([torch.sort(start_or_end).values, position.new_tensor([total])])
    max_seqlen = min(mask.seq_len, mask.fixed_block_size or mask.seq_len)
    return cu_seqlens, max_seqlen, segment_ids


def _kernel_missing(device_type: str) -> str | None:
    """None if this torch has a usable varlen_attn for the device type, else the reason it has not."""
    if varlen_attn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if "window_size" not in _VARLEN_PARAMS:
        return f"torch {torch.__version__}'s varlen_attn has no window_size (needs torch >= 2.11)"
    if device_type != "cuda":
        return f"varlen_attn needs CUDA, not {device_type}"
    return None


def _kernel_usable(q: torch.Tensor) -> str | None:
    """None if varlen_attn can run on q, else the reason it cannot."""
    missing = _kernel_missing(q.device.type)
    if missing is not None:
        return missing
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"varlen_attn needs float16/bfloat16, got {q.dtype}"
    return None


@register_attention_backend("varlen")
class VarlenAttention(AttentionBackend):
    """Option ``host_sync``: True (default) builds exactly the step's segments with one device-to-host
    sync; False builds them without (fixed-length ``cu_seqlens`` padded with empty segments, longest
    segment bounded by the row), so the host never waits for the device (docs/attention.md)."""

    supports_sinks = False
    supports_shared_prompt = False

    def __init__(
        self, attn_mask_type: str = "causal", fixed_block_size: int | None = None, *, host_sync: bool = True
    ) -> None:
        super().__init__(attn_mask_type, fixed_block_size)
        self.host_sync = _checked_host_sync(host_sync)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, host_sync={self.host_sync}"

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> None:
        super().check_options(options)
        if options and "host_sync" in options:
            _checked_host_sync(options["host_sync"])

    def describe(self, device_type: str) -> str:
        missing = _kernel_missing(device_type)
        if missing is not None:
            return f"varlen: the same segments as a dense mask on the math path ({missing})"
        sync = "one host sync per step" if self.host_sync else "no host sync (padded cu_seqlens)"
        return f"varlen: FlashAttention varlen_attn over cu_seqlens, {sync}; float32 inputs run the dense math path"

    def _build_one(self, mask: AttentionMask, sliding_window: int) -> VarlenMask:
        # Segments do not depend on the window: build them once per step and share them across keys.
        shared = next((m for m in mask.masks.values() if isinstance(m, VarlenMask)), None)
        if shared is None:
            cu_seqlens, max_seqlen, segment_ids = build_cu_seqlens(mask, self.host_sync)
        else:
            cu_seqlens, max_seqlen, segment_ids = shared.cu_seqlens, shared.max_seqlen, shared.segment_ids
        return VarlenMask(cu_seqlens, max_seqlen, segment_ids, sliding_window)

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
        if sink_weights is not None:
            can = [n for n in list_attention_backends() if get_attention_backend(n).supports_sinks]
            raise NotImplementedError(
                "the varlen backend does not support attention sinks (sink_weights); "
                f"backends that do: {', '.join(can)}"
            )
        segments = self._mask_for(attention_mask, q, sliding_window)
        reason = _kernel_usable(q)
        if reason is not None:  # the same segments, densely (describe() names this case for the run's log)
            return attention_math(q, k, v, _dense_segments(segments), scale=scale, enable_gqa=enable_gqa)

        batch, h_q, seq_len, head_dim = q.shape
        if groups > 1 and "enable_gqa" not in _VARLEN_PARAMS:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        # [B, H, S, D] -> [B*S, H, D]
        q_THD, k_THD, v_THD = (t.transpose(1, 2).reshape(batch * seq_len, t.shape[1], t.shape[-1]) for t in (q, k, v))
        kwargs = {"scale": scale, "window_size": (sliding_window if sliding_window > 0 else -1, 0)}
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = groups > 1
        cu, max_len = segments.cu_seqlens, segments.max_seqlen
        out_THD = varlen_attn(q_THD, k_THD, v_THD, cu, cu, max_len, max_len, **kwargs)
        return out_THD.view(batch, seq_len, h_q, -1).transpose(1, 2)


def _dense_segments(segments: VarlenMask) -> torch.Tensor:
    """The boolean ``[B, 1, S, S]`` mask the segments mean: causal, same segment, within the window."""
    seg_BS = segments.segment_ids
    seq_len = seg_BS.shape[1]
    pos = torch.arange(seq_len, device=seg_BS.device)
    allowed_SS = pos[None, :] <= pos[:, None]
    if segments.sliding_window > 0:
        allowed_SS = allowed_SS & (pos[:, None] - pos[None, :] <= segments.sliding_window)
    return (allowed_SS[None] & (seg_BS[:, :, None] == seg_BS[:, None, :]))[:, None]


def _checked_host_sync(value: Any) -> bool:
    if not isinstance(value, bool):
        raise AttentionConfigError(f"attention=varlen option host_sync={value!r} is not valid; choose true or false")
    return value
