"""The contract every attention backend follows, and the readable math path they fall back to.

A backend is an ``nn.Module`` without parameters, configured once with the mask type:

    backend = get_attention_backend("sdpa")(attn_mask_type="block_causal", fixed_block_size=None)
    mask = backend.build_mask(input_ids_BS, eos_id, sliding_windows=(0,), position_ids_BS=positions)  # per step
    out_BHSD = backend(q_BHSD, k_BHSD, v_BHSD, attention_mask=mask, enable_gqa=True)  # every layer

``build_mask`` is the only place a backend's per-step mask is made, so nothing outside the backend
branches on its name. The same holds for everything else that differs between backends:

- its own options are keyword-only ``__init__`` parameters (``option_names``); ``check_options`` refuses
  an unknown one by name, listing the valid ones;
- ``check_run(seq_len=..., device_type=..., options=...)`` refuses a run the backend cannot serve
  before any data or model work;
- ``describe(device_type)`` is one line saying which kernel runs where, for the run's log.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from nemo_lite.components.attention.masks import (
    AttentionMask,
    branches_of,
    dense_mask,
    document_ids,
    validate_mask_config,
    validate_window,
)
from nemo_lite.errors import NemoLiteError


class AttentionConfigError(NemoLiteError, ValueError):
    """A backend option or the run's shape does not suit the backend; one line naming the value and the fix."""


def shared_prompt_refusal(backend: str) -> str:
    return (
        f"attention={backend} cannot express attn_mask_type=shared_prompt (its segments are contiguous runs of "
        "tokens, and a shared prompt's second answer sees the prompt but not the first answer); use flex, sdpa or "
        "eager, or data.shared_prompt=false with block_causal"
    )


class AttentionBackend(nn.Module):
    """Base class: q/k/v are ``[B, H, S, D]``; the output is ``[B, Hq, S, Dv]`` in q's dtype.

    A subclass with options of its own declares them as keyword-only ``__init__`` parameters after
    ``attn_mask_type`` and ``fixed_block_size``; that signature is the list ``check_options`` checks against.
    """

    name: ClassVar[str] = "base"
    supports_sinks: ClassVar[bool] = True
    # Can express attn_mask_type="shared_prompt" (a branch sees the trunk below its fork: not a contiguous run).
    supports_shared_prompt: ClassVar[bool] = True

    def __init__(self, attn_mask_type: str = "causal", fixed_block_size: int | None = None) -> None:
        super().__init__()
        validate_mask_config(attn_mask_type, fixed_block_size)
        if attn_mask_type == "shared_prompt" and not self.supports_shared_prompt:
            raise AttentionConfigError(shared_prompt_refusal(self.name))
        self.attn_mask_type = attn_mask_type
        self.fixed_block_size = fixed_block_size

    def extra_repr(self) -> str:
        return f"attn_mask_type={self.attn_mask_type!r}, fixed_block_size={self.fixed_block_size}"

    # ---- configuration ------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The backend's own options: the keyword-only parameters of its ``__init__``."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    @classmethod
    def check_options(cls, options: Mapping[str, Any] | None) -> None:
        """Refuse option names this backend does not have (subclasses also check their values)."""
        unknown = [key for key in (options or {}) if key not in cls.option_names()]
        if unknown:
            bad = ", ".join(repr(key) for key in unknown)
            valid = ", ".join(cls.option_names())
            valid = f"its options: {valid}" if valid else "it takes no options"
            raise AttentionConfigError(f"attention={cls.name} has no option {bad}; {valid}")

    @classmethod
    def check_run(cls, *, seq_len: int, device_type: str, options: Mapping[str, Any] | None = None) -> None:
        """Refuse, before any data or model work, a run this backend cannot serve (default: only bad options)."""
        cls.check_options(options)

    def describe(self, device_type: str) -> str:
        """One line for the run's log: which kernel computes attention on this device type."""
        return f"{self.name}: {type(self).__name__}"

    # ---- per step -------------------------------------------------------------------------
    def build_mask(
        self,
        input_ids_BS: torch.Tensor,
        eos_id: int | None = None,
        sliding_windows: Iterable[int] = (0,),
        position_ids_BS: torch.Tensor | None = None,
    ) -> AttentionMask:
        """Build the step's masks from the token ids (and for shared_prompt the position ids), on the ids' device."""
        if input_ids_BS.dim() != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids_BS.shape)}")
        doc_ids = branches = None
        if self.attn_mask_type in ("block_causal", "shared_prompt"):
            if eos_id is None:
                raise ValueError(f"attn_mask_type={self.attn_mask_type!r} needs eos_id to find document boundaries")
            doc_ids = document_ids(input_ids_BS, eos_id)
        if self.attn_mask_type == "shared_prompt":
            if position_ids_BS is None:
                raise ValueError(
                    "attn_mask_type='shared_prompt' finds where answers fork by the position ids: pass "
                    "position_ids_BS (the batch's position_ids) to build_mask"
                )
            branches = branches_of(doc_ids, position_ids_BS)
        batch_size, seq_len = input_ids_BS.shape
        mask = AttentionMask(
            backend=self.name,
            attn_mask_type=self.attn_mask_type,
            fixed_block_size=self.fixed_block_size,
            seq_len=seq_len,
            batch_size=batch_size,
            device=input_ids_BS.device,
            doc_ids=doc_ids,
            branches=branches,
        )
        for window in sorted(set(sliding_windows)):
            validate_window(window)
            self._add_window(mask, window)
        return mask

    def _add_window(self, mask: AttentionMask, sliding_window: int) -> None:
        """Store what this backend needs of one window in the step's masks (default: :meth:`_build_one`)."""
        mask.masks[mask.key(sliding_window)] = self._build_one(mask, sliding_window)

    def _build_one(self, mask: AttentionMask, sliding_window: int) -> Any:
        """The backend's object for one key of the step (default: a dense boolean mask)."""
        return dense_mask(
            mask.seq_len,
            doc_ids_BS=mask.doc_ids,
            fixed_block_size=mask.fixed_block_size,
            sliding_window=sliding_window,
            device=mask.device,
            branches=mask.branches,
        )

    def _mask_for(self, attention_mask: AttentionMask | None, q: torch.Tensor, sliding_window: int) -> Any:
        """The object for this call's window; built (once, then kept for the step) if missing."""
        if attention_mask is None:
            if self.attn_mask_type != "causal":
                raise ValueError(
                    f"{self.attn_mask_type} attention needs the step's mask: call build_mask(input_ids, eos_id) "
                    "once per step and pass it as attention_mask="
                )
            attention_mask = AttentionMask(
                backend=self.name,
                attn_mask_type=self.attn_mask_type,
                fixed_block_size=self.fixed_block_size,
                seq_len=q.shape[-2],
                batch_size=q.shape[0],
                device=q.device,
                doc_ids=None,
            )
        if attention_mask.backend != self.name:
            raise ValueError(
                f"attention_mask was built by backend {attention_mask.backend!r} but is used by {self.name!r}; "
                "build it with the same backend that consumes it"
            )
        if attention_mask.seq_len != q.shape[-2]:
            raise ValueError(f"attention_mask is for seq_len={attention_mask.seq_len}, q has {q.shape[-2]}")
        if attention_mask.batch_size != q.shape[0]:
            raise ValueError(f"attention_mask is for batch_size={attention_mask.batch_size}, q has {q.shape[0]}")
        validate_window(sliding_window)
        key = attention_mask.key(sliding_window)
        if key not in attention_mask.masks:
            self._add_window(attention_mask, sliding_window)
        return attention_mask.masks[key]

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
        raise NotImplementedError


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool, sinks: torch.Tensor | None):
    """Shape checks shared by the backends; returns the number of query heads per KV head."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    h_q, h_kv = q.shape[1], k.shape[1]
    if v.shape[1] != h_kv:
        raise ValueError(f"k and v must have the same number of heads, got {h_kv} and {v.shape[1]}")
    if h_q != h_kv:
        if not enable_gqa:
            raise ValueError(f"q has {h_q} heads and k/v have {h_kv}: pass enable_gqa=True for grouped-query attention")
        if h_q % h_kv:
            raise ValueError(f"grouped-query attention needs Hq % Hkv == 0, got Hq={h_q}, Hkv={h_kv}")
    if sinks is not None and tuple(sinks.shape) != (h_q,):
        raise ValueError(f"sink_weights must have one logit per query head, shape ({h_q},), got {tuple(sinks.shape)}")
    return h_q // h_kv


def attention_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None,
    *,
    scale: float | None = None,
    sink_weights: torch.Tensor | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention written out: scores, mask, softmax (with the sink logit), weighted sum.

    Computed in float32 (float64 when the inputs are float64), returned in q's dtype.

    ``allowed`` is a boolean mask broadcastable to ``[B, Hq, S, S]`` (True = attend) or None.
    """
    groups = check_qkv(q, k, v, enable_gqa, sink_weights)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if groups > 1:  # query head h reads KV head h // groups
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores_BHSS = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if allowed is not None:
        scores_BHSS = scores_BHSS.masked_fill(~allowed, float("-inf"))
    if sink_weights is not None:
        # One extra logit per head with no value vector: it only takes probability mass away.
        sink_BHS1 = sink_weights.to(acc).view(1, -1, 1, 1).expand(*scores_BHSS.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores_BHSS, sink_BHS1], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores_BHSS, dim=-1)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)
