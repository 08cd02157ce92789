"""What the loader reads: ``Document``, the ``DocumentSource`` protocol, and the per-epoch order.

Both ends import this module: ``sources`` (documents from files and hub datasets) builds sources,
``loader`` reads them. ``ListSource`` is the in-memory source (tests, small experiments).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

from nemo_lite.components.datasets.packing import _as_document


class Document(NamedTuple):
    ids: list[int]
    prompt_len: int = 0  # leading prompt tokens (no loss on them); 0 for plain text
    replaced_chars: int = 0  # U+FFFD characters in the source text (undecodable bytes)
    # Per token: 1 = may be a loss target, 0 = never (a conversation's non-assistant tokens); None = use prompt_len
    trainable: list[int] | None = None


class DocumentSource(Protocol):
    """What the loader reads: documents in a deterministic order per epoch."""

    description: str  # for error messages: "'data/*.jsonl' (3 json files)"
    has_prompts: bool  # documents carry prompt_len > 0 or a trainable mask
    # Optional (False when absent): no document is cut by a row boundary (the packer pads the row instead).
    whole_documents: bool

    def documents(self, epoch: int, start: int) -> Iterator[Document]:
        """The documents of ``epoch`` in order, from the ``start``-th on."""
        ...


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` fixed by (seed, epoch), the same on every machine and version.

    (``random.Random`` seeded with a str hashes it with SHA-512; its shuffle is stable across
    Python versions, unlike a permutation from torch or numpy.)
    """
    order = list(range(n))
    random.Random(f"nemo_lite/shuffle/{seed}/{epoch}").shuffle(order)
    return order


class ListSource:
    """Documents held in memory: id lists, or ``(ids, prompt_len)`` pairs."""

    def __init__(
        self,
        documents: Sequence[Sequence[int] | tuple[Sequence[int], int]],
        *,
        shuffle: bool = False,
        seed: int = 0,
        description: str = "in-memory documents",
    ) -> None:
        self._docs = [_as_document(d) for d in documents]
        self.shuffle, self.seed, self.description = shuffle, seed, description
        self.has_prompts = any(p for _, p in self._docs)
        self.whole_documents = False

    def documents(self, epoch: int, start: int) -> Iterator[Document]:
        order = epoch_order(len(self._docs), epoch, self.seed) if self.shuffle else range(len(self._docs))
        for i in order[start:]:
            ids, prompt_len = self._docs[i]
            yield Document(list(ids), prompt_len)
