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
- shared_prompt (preference pairs packed as ``prompt chosen p rejected``, docs/preference.md): block_causal,
  where a document may fork into branches. A branch starts where the position ids do not count on by one
  (``pos[t] != pos[t-1] + 1``) inside a document; the document's first branch is its trunk. A query sees
  the earlier keys of its own branch, and the trunk keys whose position is below the position its branch
  starts at: the rejected answer sees the prompt and itself, not the chosen answer, so each answer attends
  as its own sequence ``prompt answer`` would. A sliding window then counts positions, ``pos[q] - pos[k] <=
  w``. A document without forks is block_causal's.

Every backend builds its per-step object (a ``BlockMask``, a boolean tensor, ``cu_seqlens``) from
these rules; :func:`dense_mask` is the readable definition the dense paths use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

MASK_TYPES = ("causal", "block_causal", "shared_prompt")
# Keys of the trunk that no fork position reaches (int32, so the mask's tensors stay small).
_NEVER = torch.iinfo(torch.int32).max

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
    if attn_mask_type == "shared_prompt" and fixed_block_size is not None:
        raise ValueError(
            f"fixed_block_size={fixed_block_size} cuts rows by token index, which splits a shared prompt's branches "
            "arbitrarily; use fixed_block_size=None with attn_mask_type='shared_prompt'"
        )


class Branches(NamedTuple):
    """What the shared_prompt rule reads, per token, ``[B, S]`` int32 each (:func:`branches_of`)."""

    positions: torch.Tensor  # the position ids
    branch_ids: torch.Tensor  # the branch index, increasing along the row
    trunk_pos: torch.Tensor  # as a key: its position if it is in its document's trunk, else never reached
    fork_pos: torch.Tensor  # as a query: the position its branch starts at (0 in the trunk: no extra keys)


def branches_of(doc_ids_BS: torch.Tensor, position_ids_BS: torch.Tensor) -> Branches:
    """The branches of the shared_prompt rule, from the document ids and the position ids, on their device."""
    if position_ids_BS.shape != doc_ids_BS.shape:
        raise ValueError(
            f"position_ids must be [B, S] like input_ids {tuple(doc_ids_BS.shape)}, got {tuple(position_ids_BS.shape)}"
        )
    pos = position_ids_BS.to(torch.int32)
    seq_len = pos.shape[1]
    new_doc = torch.ones_like(pos, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids_BS[:, 1:] != doc_ids_BS[:, :-1]
    new_branch = new_doc.clone()
    new_branch[:, 1:] |= pos[:, 1:] != pos[:, :-1] + 1
    branch = torch.cumsum(new_branch, dim=1, dtype=torch.int32)
    zero = torch.zeros_like(branch)
    trunk = branch == torch.cummax(torch.where(new_doc, branch, zero), dim=1).values
    index = torch.arange(seq_len, device=pos.device, dtype=torch.int32).expand_as(pos)
    branch_start = torch.cummax(torch.where(new_branch, index, zero), dim=1).values
    fork = torch.where(trunk, zero, pos.gather(1, branch_start.long()))
    return Branches(pos, branch, torch.where(trunk, pos, torch.full_like(pos, _NEVER)), fork)


def shared_prompt_allowed(branches: Branches, q: Any, k: Any, b: Any = None) -> Any:
    """The shared_prompt rule's fork part at queries ``q`` and keys ``k`` (tensors or a flex mask_mod's
    indices; ``b`` the row there, else the tensors' leading dimension): same branch, or a trunk key below the
    query's fork. Causality and the document are checked by the caller."""
    if b is None:
        same = branches.branch_ids[:, q] == branches.branch_ids[:, k]
        return same | (branches.trunk_pos[:, k] < branches.fork_pos[:, q])
    same = branches.branch_ids[b, q] == branches.branch_ids[b, k]
    return same | (branches.trunk_pos[b, k] < branches.fork_pos[b, q])


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
    branches: Branches | None = None,
) -> torch.Tensor:
    """Boolean mask (True = attend) of the mask rules.

    Shape ``[B, 1, S, S]`` when document ids are given (block_causal, shared_prompt with ``branches``), else
    ``[1, 1, S, S]``.
    """
    if doc_ids_BS is not None:
        device = doc_ids_BS.device
    pos = torch.arange(seq_len, device=device)
    q_S1, k_1S = pos[:, None], pos[None, :]
    allowed_SS = k_1S <= q_S1
    if fixed_block_size:
        allowed_SS = allowed_SS & (q_S1 // fixed_block_size == k_1S // fixed_block_size)
    if sliding_window > 0 and branches is None:
        allowed_SS = allowed_SS & (q_S1 - k_1S <= sliding_window)
    if doc_ids_BS is None:
        return allowed_SS[None, None]
    allowed_BSS = allowed_SS[None] & (doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :])
    if branches is not None:
        allowed_BSS = allowed_BSS & shared_prompt_allowed(branches, q_S1, k_1S)
        if sliding_window > 0:
            positions = branches.positions
            allowed_BSS = allowed_BSS & (positions[:, :, None] - positions[:, None, :] <= sliding_window)
    return allowed_BSS[:, None]


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
    branches: Branches | None = None  # shared_prompt: where the documents fork (branches_of)

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
    if mask.branches is not None:  # a branch is a segment, and a fork also sees the trunk below its position
        starts_BS = starts_BS | (mask.branches.branch_ids != torch.roll(mask.branches.branch_ids, 1, dims=1))
    seg_start_BS = torch.cummax(torch.where(starts_BS, pos_S, torch.zeros_like(pos_S)), dim=1).values
    visible_BS = pos_S - seg_start_BS + 1
    if mask.branches is not None:
        doc_start_BS = torch.cummax(torch.where(segment_starts(mask), pos_S, torch.zeros_like(pos_S)), dim=1).values
        first_pos_BS = mask.branches.positions.gather(1, doc_start_BS)
        trunk_BS = mask.branches.fork_pos == 0
        visible_BS = visible_BS + torch.where(trunk_BS, 0, mask.branches.fork_pos - first_pos_BS)
    if sliding_window > 0:
        visible_BS = visible_BS.clamp(max=sliding_window + 1)
    return visible_BS.sum()
