"""Packing: token-id documents -> rows of ``seq_len + 1`` tokens -> ``[B, S]`` batches.

Pure Python and torch; no ``datasets``, no tokenizer. The rules (docs/data.md has a picture):

- Every document is followed by one EOS; the stream is the concatenation ``doc0 EOS doc1 EOS ...``.
  Empty documents are skipped (and counted): they would only add a lone EOS.
- Row ``r`` is ``stream[r*S : r*S + S + 1]``; ``input_ids = row[:-1]``, ``labels = row[1:]``. So
  the last token of a row is the first token of the next: each token of the stream is an input
  exactly once and a label exactly once (except the very first token, which is only an input).
  Nothing is dropped or repeated at row boundaries.
- A document longer than what is left of a row continues in the next row.
- Document boundaries are the EOS tokens, as in the attention masks (docs/attention.md, "The mask
  rules"): a document ends at (and includes) its EOS. ``position_ids`` count the distance to the
  previous EOS (0 after every EOS), so they restart exactly where the attention mask starts a new
  document, and a document continued from the previous row carries on counting.
- Labels: the label of an EOS position is the next document's first token. It is kept for
  pretraining and set to -100 with ``mask_cross_document_labels``. Tokens marked untrainable (the
  prompt of a fine-tuning example, a conversation's non-assistant tokens) get label -100 where they
  are the target.
- ``whole_documents`` (conversations): a document that does not fit in what is left of the row
  starts the next row instead; the rest of the row is filled with EOS tokens (one-token documents,
  never a target). A document and its EOS must then fit in ``seq_len`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from nemo_lite.errors import IGNORE_INDEX

# The packer's buffer is compacted (copied to a new list) once this many consumed tokens sit
# in front of it. Never compacted in place: snapshots hold references to the old lists.
_COMPACT_AFTER = 1 << 16


class PackedRow(NamedTuple):
    """One row of ``seq_len + 1`` tokens, before the input/label shift."""

    tokens: list[int]
    positions: list[int]  # distance to the previous EOS: 0 on the first token of each document
    trainable: list[int] | None  # 1 = may be a loss target, 0 = prompt token; None = all trainable


class _BufferView(NamedTuple):
    """An O(1) snapshot of the packer's leftover tokens (materialized only when saved)."""

    tokens: list[int]
    positions: list[int]
    trainable: list[int] | None
    start: int
    end: int

    def to_state(self) -> dict[str, list[int]]:
        s, e = self.start, self.end
        return {
            "tokens": self.tokens[s:e],
            "positions": self.positions[s:e],
            "trainable": [] if self.trainable is None else self.trainable[s:e],
        }


class DocumentPacker:
    """Incremental packer: ``push`` documents, ``pop_row`` rows while ``rows_ready``.

    ``stats`` counts ``documents`` (packed), ``empty_documents`` (skipped) and ``tokens`` (packed,
    EOS included, row padding too). With ``track_prompts`` the packer also keeps which tokens are
    prompt tokens; ``whole_documents`` implies it.
    """

    def __init__(
        self,
        *,
        seq_len: int,
        eos_id: int,
        track_prompts: bool = False,
        whole_documents: bool = False,
        stats: dict[str, int] | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self.whole_documents = whole_documents
        track_prompts = track_prompts or whole_documents  # the row padding is never a target
        self.track_prompts = track_prompts
        self.stats = stats if stats is not None else {}
        for key in ("documents", "empty_documents", "tokens"):
            self.stats.setdefault(key, 0)
        self._tokens: list[int] = []
        self._positions: list[int] = []
        self._trainable: list[int] | None = [] if track_prompts else None
        self._start = 0  # index of the first token not yet consumed (the next row starts here)

    # -- input --------------------------------------------------------------------------------
    def push(
        self,
        ids: Sequence[int],
        prompt_len: int = 0,
        trainable: Sequence[int] | None = None,
        positions: Sequence[int] | None = None,
    ) -> bool:
        """Append one document and its EOS. Returns False (and counts it) if it is empty.

        ``trainable`` (one int per token, 0 = never a target) marks the tokens that may be loss targets;
        its EOS is not one. A value above 1 is kept as it is (a preference pair marks its chosen answer 1 and
        its rejected answer 2). Without it, the first ``prompt_len`` tokens are not targets and the rest and
        the EOS are. ``positions`` (one per token) replaces the distance to the previous EOS; the EOS
        then gets the last position + 1.
        """
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        n = len(ids)
        if n == 0:
            self.stats["empty_documents"] += 1
            return False
        if prompt_len or trainable is not None:
            if self._trainable is None:
                raise ValueError("push(prompt_len>0 or trainable) needs a DocumentPacker(track_prompts=True)")
            if not 0 <= prompt_len <= n:
                raise ValueError(f"prompt_len={prompt_len} is outside the document's {n} tokens")
            if trainable is not None and len(trainable) != n:
                raise ValueError(f"trainable has {len(trainable)} entries for a document of {n} tokens")
        if positions is not None and len(positions) != n:
            raise ValueError(f"positions has {len(positions)} entries for a document of {n} tokens")
        if self.whole_documents:
            self._start_row_if_needed(n)
        eos = self.eos_id
        self._tokens.extend(ids)
        self._tokens.append(eos)
        if positions is not None:
            self._positions.extend(positions)
            self._positions.append(positions[-1] + 1)
        elif eos in ids:  # an EOS inside the text ends a document there too (the masks' rule)
            pos = 0
            for t in ids:
                self._positions.append(pos)
                pos = 0 if t == eos else pos + 1
            self._positions.append(pos)
        else:
            self._positions.extend(range(n + 1))
        if trainable is not None:
            self._trainable.extend(trainable)
            self._trainable.append(0)
        elif self._trainable is not None:
            self._trainable.extend([0] * prompt_len)
            self._trainable.extend([1] * (n - prompt_len + 1))
        self.stats["documents"] += 1
        self.stats["tokens"] += n + 1
        return True

    def _start_row_if_needed(self, n: int) -> None:
        """Pad the current row with EOS when a document of ``n`` tokens + EOS does not fit in it."""
        if n + 1 > self.seq_len:
            raise ValueError(
                f"a document of {n} tokens and its EOS do not fit in one row of seq_len={self.seq_len} "
                "(whole_documents packing); cut it first"
            )
        used = (len(self._tokens) - self._start) % self.seq_len  # tokens already in the row being filled
        if used == 0 or used + n + 1 <= self.seq_len:
            return
        pad = self.seq_len - used
        self._tokens.extend([self.eos_id] * pad)
        # After the previous document's EOS every pad token is a document of its own: position 0.
        self._positions.extend([0] * pad)
        self._trainable.extend([0] * pad)
        self.stats["tokens"] += pad

    # -- output -------------------------------------------------------------------------------
    @property
    def buffered_tokens(self) -> int:
        return len(self._tokens) - self._start

    @property
    def rows_ready(self) -> int:
        """Rows that can be popped now (each needs seq_len + 1 buffered tokens)."""
        return max(0, (len(self._tokens) - self._start - 1) // self.seq_len)

    def pop_row(self) -> PackedRow:
        s, e = self._start, self._start + self.seq_len + 1
        if e > len(self._tokens):
            raise IndexError(f"no full row buffered ({self.buffered_tokens} tokens, need {self.seq_len + 1})")
        trainable = None if self._trainable is None else self._trainable[s:e]
        row = PackedRow(self._tokens[s:e], self._positions[s:e], trainable)
        self._advance()
        return row

    def skip_row(self) -> None:
        """Consume one row without building it (a row that belongs to another rank)."""
        if self.rows_ready < 1:
            raise IndexError(f"no full row buffered ({self.buffered_tokens} tokens, need {self.seq_len + 1})")
        self._advance()

    def _advance(self) -> None:
        self._start += self.seq_len
        if self._start >= _COMPACT_AFTER and 2 * self._start >= len(self._tokens):
            s = self._start
            self._tokens = self._tokens[s:]
            self._positions = self._positions[s:]
            if self._trainable is not None:
                self._trainable = self._trainable[s:]
            self._start = 0

    # -- state --------------------------------------------------------------------------------
    def view(self) -> _BufferView:
        """O(1) snapshot of the leftover buffer; ``.to_state()`` turns it into plain lists."""
        return _BufferView(self._tokens, self._positions, self._trainable, self._start, len(self._tokens))

    def state_dict(self) -> dict[str, list[int]]:
        return self.view().to_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        tokens, positions = list(state["tokens"]), list(state["positions"])
        trainable = list(state.get("trainable") or [])
        if len(positions) != len(tokens) or (trainable and len(trainable) != len(tokens)):
            raise ValueError(
                "packer state is inconsistent: tokens, positions and trainable must have the same length, "
                f"got {len(tokens)}, {len(positions)}, {len(trainable)}"
            )
        if trainable and not self.track_prompts:
            raise ValueError("packer state has prompt masks but this packer does not track prompts")
        self._tokens, self._positions, self._start = tokens, positions, 0
        if self.track_prompts:
            self._trainable = trainable if trainable else [1] * len(tokens)


def _as_document(doc: Any) -> tuple[Sequence[int], int]:
    """A document is a sequence of ids, or ``(ids, prompt_len)``."""
    if isinstance(doc, tuple) and len(doc) == 2 and isinstance(doc[1], int) and not isinstance(doc[0], int):
        return doc[0], doc[1]
    return doc, 0


def pack_documents(
    documents: Iterable[Sequence[int] | tuple[Sequence[int], int]],
    *,
    seq_len: int,
    eos_id: int,
    track_prompts: bool = False,
    stats: dict[str, int] | None = None,
) -> Iterator[PackedRow]:
    """Pack documents (id lists, or ``(ids, prompt_len)`` pairs) into rows of ``seq_len + 1``.

    Yields every full row; a final partial row is not yielded. ``stats``, when given, is updated
    in place (``documents``, ``empty_documents``, ``tokens``).
    """
    packer = DocumentPacker(seq_len=seq_len, eos_id=eos_id, track_prompts=track_prompts, stats=stats)
    for doc in documents:
        ids, prompt_len = _as_document(doc)
        packer.push(ids, prompt_len)
        while packer.rows_ready:
            yield packer.pop_row()


def collate_rows(
    rows: Sequence[PackedRow],
    *,
    eos_id: int,
    position_ids: bool = True,
    mask_cross_document_labels: bool = False,
    answer_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """Rows -> ``{"input_ids", "labels", "position_ids"}``, CPU int64 ``[B, S]`` each.

    ``answer_ids`` (preference pairs, whose rows mark chosen answer tokens 1 and rejected ones 2 in
    ``trainable``) adds ``"answer_ids"``: per label position, 0 where the label is no answer token, else
    ``2 * k + 1`` for the chosen and ``2 * k + 2`` for the rejected answer of the row's ``k``-th pair."""
    tokens_BT = torch.tensor([r.tokens for r in rows], dtype=torch.int64)  # T = S + 1
    input_ids_BS = tokens_BT[:, :-1].contiguous()
    labels_BS = tokens_BT[:, 1:].clone()  # its own memory: the masking below must not touch input_ids
    seq_len = input_ids_BS.shape[1]
    if mask_cross_document_labels:
        labels_BS[input_ids_BS == eos_id] = IGNORE_INDEX
    if rows and rows[0].trainable is not None:
        trainable_BT = torch.tensor([r.trainable for r in rows], dtype=torch.bool)
        labels_BS[~trainable_BT[:, 1:]] = IGNORE_INDEX
    if position_ids:
        position_ids_BS = torch.tensor([r.positions[:-1] for r in rows], dtype=torch.int64)
    else:
        position_ids_BS = torch.arange(seq_len, dtype=torch.int64).expand(len(rows), seq_len).contiguous()
    batch = {"input_ids": input_ids_BS, "labels": labels_BS, "position_ids": position_ids_BS}
    if answer_ids:
        batch["answer_ids"] = torch.tensor([pair_answer_ids(r.trainable[1:]) for r in rows], dtype=torch.int64)
    return batch


def pair_answer_ids(sides: Sequence[int]) -> list[int]:
    """Label sides (0 none, 1 chosen, 2 rejected) -> answer ids (0, ``2k+1``, ``2k+2``): a pair's chosen
    answer comes before its rejected one, so a chosen token after a rejected one starts the next pair."""
    out, pair, last = [], -1, 0
    for side in sides:
        if side == 0:
            out.append(0)
            continue
        if side == 1 and last != 1:
            pair += 1
        last = side
        out.append(2 * pair + side)
    return out
