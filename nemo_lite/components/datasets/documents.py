"""What the loader reads: ``Document``, the ``DocumentSource`` protocol, and the per-epoch order.

Both ends import this module: ``sources`` (documents from files and hub datasets) builds sources,
``loader`` reads them. (``nemo_lite.testing.data.ListSource`` is an in-memory source for tests.)
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import NamedTuple, Protocol


class Document(NamedTuple):
    ids: list[int]
    prompt_len: int = 0  # leading prompt tokens (no loss on them); 0 for plain text
    replaced_chars: int = 0  # U+FFFD characters in the source text (undecodable bytes)
    # Per token: 1 = may be a loss target, 0 = never (a conversation's non-assistant tokens); None = use prompt_len
    trainable: list[int] | None = None
    # Per token: its position id; None = the distance to the previous EOS (a preference pair with a shared
    # prompt restarts the positions after the prompt for each answer, docs/preference.md)
    positions: list[int] | None = None


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
