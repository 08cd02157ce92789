"""The mask rules every attention backend computes, in one place.

Positions ``q`` (query) and ``k`` (key) in row ``b`` of a packed batch:

- causal: ``k <= q``.
- document ids: a document ends at (and includes) each EOS; tokens after the last EOS form one
  more document; a row without EOS is one document; two EOS in a row make a one-token document.
- block_causal: causal and ``doc[b, q] == doc[b, k]``.
- fixed_block_size n: additionally ``q // n == k // n``, with the base rule read at the *global*
  positions (never at ``q % n``, which would read the wrong document ids).
- sliding_window w > 0: additionally ``q - k <= w``. A Hugging Face ``sliding_window = W`` means
  ``q - k < W``, i.e. ``w = W - 1`` here.

Every backend builds its per-step object (a ``BlockMask``, a boolean tensor, ``cu_seqlens``) from
these rules; :func:`dense_mask` is the readable definition the dense paths use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

MASK_TYPES = ("causal", "block_causal")

# Key of one mask within a step. (attn_mask_type, fixed_block_size) without a sliding window;
# (sliding_window, is_block_causal, fixed_block_size or 0) with one. Same type as the seed API.
FLEX_ATTN_MASK_T = tuple[str, int | None] | tuple[int, int, int]


def mask_key(attn_mask_type: str, fixed_block_size: int | None, sliding_window: int = 0) -> FLEX_ATTN_MASK_T:
    if sliding_window > 0:
        return (sliding_window, int(attn_mask_type == "block_causal"), fixed_block_size or 0)
    return (attn_mask_type, fixed_block_size)


def validate_mask_config(attn_mask_type: str, fixed_block_size: int | None) -> None:
    if attn_mask_type not in MASK_TYPES:
        raise ValueError(f"attn_mask_type={attn_mask_type!r} is not supported; choose one of {list(MASK_TYPES)}")
    if fixed_block_size is not None and (not isinstance(fixed_block_size, int) or fixed_block_size <= 0):
        raise ValueError(f"fixed_block_size must be a positive int or None, got {fixed_block_size!r}")


def validate_window(sliding_window: int) -> None:
    if not isinstance(sliding_window, int) or sliding_window < 0:
        raise ValueError(f"sliding_window must be an int >= 0 (0 = no window), got {sliding_window!r}")


def document_ids(input_ids_BS: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of every token, ``[B, S]`` int32 on the ids' device.

    An EOS belongs to the document it ends: the index counts the EOS tokens strictly before a
    position (an exclusive cumulative sum), so it increments on the token after each EOS.
    """
    if input_ids_BS.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids_BS.shape)}")
    is_eos = (input_ids_BS == eos_id).to(torch.int32)
    return (torch.cumsum(is_eos, dim=1, dtype=torch.int32) - is_eos).to(torch.int32)


def dense_mask(
    seq_len: int,
    *,
    doc_ids_BS: torch.Tensor | None = None,
    fixed_block_size: int | None = None,
    sliding_window: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean mask (True = attend) of the mask rules.

    Shape ``[B, 1, S, S]`` when document ids are given (block_causal), else ``[1, 1, S, S]``.
    """
    if doc_ids_BS is not None:
        device = doc_ids_BS.device
    pos = torch.arange(seq_len, device=device)
    q_S1, k_1S = pos[:, None], pos[None, :]
    allowed_SS = k_1S <= q_S1
    if fixed_block_size:
        allowed_SS = allowed_SS & (q_S1 // fixed_block_size == k_1S // fixed_block_size)
    if sliding_window > 0:
        allowed_SS = allowed_SS & (q_S1 - k_1S <= sliding_window)
    if doc_ids_BS is None:
        return allowed_SS[None, None]
    same_doc_BSS = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    return (allowed_SS[None] & same_doc_BSS)[:, None]


@dataclass
class AttentionMask:
    """The masks of one step, built once from the token ids and used by every layer.

    ``masks`` maps a :data:`FLEX_ATTN_MASK_T` key to the backend's own object for that key (a
    ``BlockMask`` for flex, a boolean tensor or ``None`` for sdpa/eager, ``cu_seqlens`` for varlen).
    ``doc_ids`` is kept so a backend can build a mask it was not asked for up front (a sliding
    window first seen in ``forward``) without going back to the token ids.
    """

    backend: str
    attn_mask_type: str
    fixed_block_size: int | None
    seq_len: int
    batch_size: int
    device: torch.device
    doc_ids: torch.Tensor | None
    masks: dict[Any, Any] = field(default_factory=dict)

    def key(self, sliding_window: int) -> FLEX_ATTN_MASK_T:
        return mask_key(self.attn_mask_type, self.fixed_block_size, sliding_window)


def segment_starts(mask: AttentionMask) -> torch.Tensor:
    """Boolean ``[B, S]``: True where a new causal segment starts (a row, a document, a fixed block).

    Within a segment every query sees every earlier key (before any sliding window)."""
    batch, seq_len = mask.batch_size, mask.seq_len
    pos = torch.arange(seq_len, device=mask.device)
    starts = (pos == 0).expand(batch, seq_len)
    if mask.doc_ids is not None:
        new_doc = torch.zeros_like(starts)
        new_doc[:, 1:] = mask.doc_ids[:, 1:] != mask.doc_ids[:, :-1]
        starts = starts | new_doc
    if mask.fixed_block_size:
        starts = starts | (pos % mask.fixed_block_size == 0)
    return starts


def allowed_pairs(mask: AttentionMask, sliding_window: int = 0) -> torch.Tensor:
    """Number of (query, key) pairs the step's mask allows, summed over the batch (a device scalar).

    For every query the visible keys are a contiguous run ending at the query: from the start of its
    segment (document and fixed block) or of the window, whichever is later.
    """
    pos_S = torch.arange(mask.seq_len, device=mask.device)
    starts_BS = segment_starts(mask)
    seg_start_BS = torch.cummax(torch.where(starts_BS, pos_S, torch.zeros_like(pos_S)), dim=1).values
    visible_BS = pos_S - seg_start_BS + 1
    if sliding_window > 0:
        visible_BS = visible_BS.clamp(max=sliding_window + 1)
    return visible_BS.sum()
