"""Data for tests and benchmarks: documents held in memory, and packed batches of random tokens.

``ListSource`` is a ``DocumentSource`` over id lists (the loader's tests). ``SyntheticPackedLoader``
replaces the configured data in benchmarks and GPU tests (``Trainer(cfg, train_loader=...)``): every
batch has a new document layout (so a benchmark sees whether anything recompiles), rows carry EOS at
document ends and ``position_ids`` that restart per document, exactly like the real loader's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from nemo_lite.components.datasets.documents import Document, epoch_order
from nemo_lite.components.datasets.packing import _as_document


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


class SyntheticPackedLoader:
    """Infinite iterable of ``{"input_ids", "labels", "position_ids"}`` int64 ``[B, S]`` batches.

    Document lengths are log-normal (sigma 1) with mean ``mean_doc``; token ids are uniform in
    ``[0, vocab_size)`` excluding ``eos_id`` (``learnable=True``: each document counts up from a
    random first token, so a model can learn it and loss curves mean something). Deterministic given
    ``seed`` and the batch index; the state is the batch index, so it resumes exactly.
    """

    tokenizer = None
    record_kind = "synthetic"

    def __init__(
        self,
        batch_size: int,
        seq_len: int,
        *,
        vocab_size: int,
        eos_id: int,
        mean_doc: float = 600.0,
        seed: int = 0,
        pin_memory: bool = False,
        learnable: bool = False,
    ) -> None:
        if not 0 <= eos_id < vocab_size:
            raise ValueError(f"eos_id={eos_id} must be in [0, vocab_size={vocab_size})")
        self.batch_size, self.seq_len, self.mean_doc, self.seed = batch_size, seq_len, mean_doc, seed
        self.vocab_size, self.eos_id, self.pin_memory = vocab_size, eos_id, pin_memory
        self.learnable = learnable
        self.index = 0

    # -- what sampling reads (the PackedDataLoader's API) -----------------------------------------
    @property
    def end_id(self) -> int:
        return self.eos_id

    def prompt_ids(self, text: str) -> list[int]:
        raise ValueError(
            "SyntheticPackedLoader has no tokenizer (its documents are random ids), so it cannot encode the prompt "
            f"{text!r}; set trainer.sample_tokens=0"
        )

    def make(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        sigma = 1.0
        mu = math.log(self.mean_doc) - sigma**2 / 2
        width = self.seq_len + 1
        rows = torch.randint(0, self.vocab_size - 1, (self.batch_size, width), generator=g)
        rows[rows >= self.eos_id] += 1  # never EOS by chance
        positions = torch.zeros(self.batch_size, width, dtype=torch.long)
        for b in range(self.batch_size):
            start = 0
            while start < width:
                length = max(1, int(torch.empty(1).log_normal_(mu, sigma, generator=g).item()))
                end = min(start + length, width)
                positions[b, start:end] = torch.arange(end - start)
                if self.learnable:  # a counting document: each token is the previous one plus one
                    first = int(rows[b, start])
                    rows[b, start:end] = (first + torch.arange(end - start)) % self.vocab_size
                    rows[b, start:end][rows[b, start:end] == self.eos_id] = (self.eos_id + 1) % self.vocab_size
                if start + length <= width:
                    rows[b, end - 1] = self.eos_id
                start += length
        batch = {"input_ids": rows[:, :-1], "labels": rows[:, 1:], "position_ids": positions[:, :-1]}
        batch = {k: v.contiguous() for k, v in batch.items()}
        if self.pin_memory and torch.cuda.is_available():
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.make(self.index)
            self.index += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.index = int(state["index"])
