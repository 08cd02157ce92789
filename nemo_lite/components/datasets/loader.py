"""``PackedDataLoader``: documents -> packed ``[B, S]`` batches, sharded by rank, resumable.

A global step takes ``world_size * batch_size`` consecutive rows from the packed stream; row ``i``
of the step goes to rank ``i % world_size``. Every rank reads (and packs) the whole stream and
builds only its own rows, so ranks see disjoint rows, together see all of them, and all stop at the
same step. The loader's state is the same on every rank: the epoch, the next document to read,
and the leftover tokens of the packer.

Batches are built by one background thread, ``prefetch`` batches ahead (0: on demand). The state
returned by ``state_dict`` is the one after the last batch *handed out*, not the one of the thread.
"""

from __future__ import annotations

import queue
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.documents import DocumentSource
from nemo_lite.components.datasets.kinds import RecordEncoder
from nemo_lite.components.datasets.packing import DocumentPacker, _BufferView, collate_rows
from nemo_lite.components.datasets.sources import build_document_source
from nemo_lite.components.datasets.tokenizer import build_tokenizer

STATE_VERSION = 1
_SUPERSEDED = (
    "this iterator of the PackedDataLoader was closed by a later iter(), load_state_dict() or reset(); "
    "use the newest iterator"
)
_STAT_KEYS = ("documents", "empty_documents", "tokens", "replaced_chars")


class _Snapshot(NamedTuple):
    epoch: int
    doc: int  # documents of `epoch` already read into the packer
    rows: int  # global rows consumed (all ranks)
    stats: dict[str, int]
    buffer: _BufferView | dict[str, list[int]] | None


class PackedDataLoader:
    """Iterable of ``{"input_ids", "labels", "position_ids"}`` CPU int64 ``[B, S]`` batches.

    Iterating again continues from the current state (the last batch handed out); use
    ``load_state_dict`` to resume from a checkpoint and ``reset`` to go back to the start.

    Sampling the trained model reads ``prompt_ids(text)``, ``end_id`` and ``record_kind``, which come
    from the record kind's ``encoder`` (``build_dataloader`` passes the source's).
    """

    def __init__(
        self,
        source: DocumentSource,
        *,
        seq_len: int,
        batch_size: int,
        eos_id: int,
        rank: int = 0,
        world_size: int = 1,
        position_ids: bool = True,
        mask_cross_document_labels: bool = False,
        num_epochs: int | None = None,
        prefetch: int = 2,
        pin_memory: bool = False,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        encoder: RecordEncoder | None = None,
    ) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if num_epochs is not None and num_epochs < 1:
            raise ValueError(f"num_epochs must be None (loop forever) or >= 1, got {num_epochs}")
        self.source = source
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eos_id = eos_id
        self.rank, self.world_size = rank, world_size
        self.position_ids = position_ids
        self.mask_cross_document_labels = mask_cross_document_labels
        self.num_epochs = num_epochs
        self.prefetch = prefetch
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.encoder = encoder
        # Preference pairs: batches carry "answer_ids" (collate_rows); optional in RecordEncoder.
        self.pairs = bool(getattr(encoder, "pairs", False))
        self.pin_memory = pin_memory and torch.cuda.is_available()
        if pin_memory and not self.pin_memory:
            warnings.warn("pin_memory=True ignored: CUDA is not available", stacklevel=2)
        self._active: _Prefetcher | None = None
        self._generation = 0  # bumped by every iter(), load_state_dict(), reset(): older iterators stop
        self._state = self._initial_state()

    # -- sampling -----------------------------------------------------------------------------
    @property
    def record_kind(self) -> str | None:
        """The record kind of the data (``"text"``, ``"chat"``, ...); None without an encoder."""
        return None if self.encoder is None else self.encoder.kind

    @property
    def end_id(self) -> int:
        """Where generation stops: the EOS, or in a chat run the end of a turn (the document delimiter
        ``eos_id`` is then a token the chat template never writes)."""
        return self.eos_id if self.encoder is None else self.encoder.end_id

    @property
    def sample_prompt(self) -> str:
        """The prompt of a sample when none is given: the record kind's own ("The" for text, a question for chat;
        "The" for a kind written before kinds named one)."""
        return getattr(self.encoder, "sample_prompt", "The")

    @property
    def chat_template(self) -> str | None:
        """The chat template conversations were rendered with (None: the data are not conversations); the export
        writes it as the tokenizer's own."""
        return getattr(self.encoder, "template", None)

    def prompt_ids(self, text: str) -> list[int]:
        """``text`` as the ids a sample starts from: its tokens, or in a chat run one user turn rendered with
        the chat template and its generation prompt."""
        if self.encoder is None:
            raise ValueError(
                f"this loader of {self.source.description} has no record encoder, so it cannot encode a prompt; "
                "build it with build_dataloader (or pass encoder=)"
            )
        return self.encoder.prompt_ids(text)

    # -- state --------------------------------------------------------------------------------
    @staticmethod
    def _initial_state() -> _Snapshot:
        return _Snapshot(epoch=0, doc=0, rows=0, stats=dict.fromkeys(_STAT_KEYS, 0), buffer=None)

    @property
    def stats(self) -> dict[str, int]:
        """Counters up to the last batch handed out: documents (packed), empty_documents
        (skipped), documents_read, tokens (packed, EOS included), replaced_chars (U+FFFD in the
        text: undecodable bytes), rows (global), epoch."""
        s = self._state
        return {
            **s.stats,
            "documents_read": s.stats["documents"] + s.stats["empty_documents"],
            "rows": s.rows,
            "epoch": s.epoch,
        }

    @property
    def epoch(self) -> int:
        return self._state.epoch

    def state_dict(self) -> dict[str, Any]:
        """Plain dict/list/int/str state (``torch.save`` / ``torch.load(weights_only=True)`` safe)."""
        s = self._state
        if s.buffer is None:
            buffer = {"tokens": [], "positions": [], "trainable": []}
        elif isinstance(s.buffer, _BufferView):
            buffer = s.buffer.to_state()
        else:
            buffer = {k: list(v) for k, v in s.buffer.items()}
        return {
            "version": STATE_VERSION,
            "epoch": s.epoch,
            "doc": s.doc,
            "rows": s.rows,
            "stats": dict(s.stats),
            "buffer": buffer,
            "source": self.source.description,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the row after the last batch of the run that saved ``state``."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a PackedDataLoader state of version {STATE_VERSION} (got {got!r})")
        missing = [k for k in ("epoch", "doc", "rows", "stats", "buffer") if k not in state]
        if missing:
            raise ValueError(f"PackedDataLoader state lacks {missing}")
        buffer = {k: list(state["buffer"].get(k) or []) for k in ("tokens", "positions", "trainable")}
        if len(buffer["positions"]) != len(buffer["tokens"]):
            raise ValueError("PackedDataLoader state: buffer tokens and positions differ in length")
        if state.get("source", self.source.description) != self.source.description:
            warnings.warn(
                f"loading a data state saved for {state['source']} into a loader of "
                f"{self.source.description}; the resumed position may not mean the same documents",
                stacklevel=2,
            )
        self.close()
        self._generation += 1
        stats = dict.fromkeys(_STAT_KEYS, 0) | {k: int(v) for k, v in state["stats"].items() if k in _STAT_KEYS}
        self._state = _Snapshot(int(state["epoch"]), int(state["doc"]), int(state["rows"]), stats, buffer)

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.close()
        self._generation += 1
        self._state = self._initial_state()

    # -- iteration ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.close()
        self._generation += 1
        generation = self._generation
        produced = self._produce(self._state)
        it: Iterator[tuple[dict[str, torch.Tensor], _Snapshot]]
        if self.prefetch > 0:
            it = self._active = _Prefetcher(produced, self.prefetch)
        else:
            it = produced
        try:
            for batch, snapshot in it:
                if generation != self._generation:
                    raise RuntimeError(_SUPERSEDED)
                self._state = snapshot
                yield batch
        finally:
            if self._active is it:
                self.close()

    def close(self) -> None:
        """Stop the background thread of the current iteration, if any."""
        if self._active is not None:
            self._active.close()
            self._active = None

    def _produce(self, start: _Snapshot) -> Iterator[tuple[dict[str, torch.Tensor], _Snapshot]]:
        stats = dict(start.stats)
        packer = DocumentPacker(
            seq_len=self.seq_len,
            eos_id=self.eos_id,
            track_prompts=self.source.has_prompts,
            whole_documents=getattr(self.source, "whole_documents", False),  # optional in DocumentSource
            stats=stats,
        )
        if start.buffer is not None:
            buf = start.buffer.to_state() if isinstance(start.buffer, _BufferView) else start.buffer
            packer.load_state_dict(buf)
        epoch, doc, rows = start.epoch, start.doc, start.rows
        rows_per_step, rank, world = self.world_size * self.batch_size, self.rank, self.world_size
        docs = self.source.documents(epoch, doc)
        epoch_from_start, packed_this_epoch, yielded = doc == 0, 0, 0
        while True:
            while packer.rows_ready < rows_per_step:
                document = next(docs, None)
                if document is None:  # end of the epoch
                    if epoch_from_start and packed_this_epoch == 0:
                        empty = f": all {doc} documents are empty" if doc else ""
                        raise ValueError(f"no documents in {self.source.description}{empty}")
                    epoch, doc = epoch + 1, 0
                    if self.num_epochs is not None and epoch >= self.num_epochs:
                        if yielded == 0 and start.rows == 0:
                            raise ValueError(
                                f"{self.source.description} has {stats['tokens']} tokens in "
                                f"{self.num_epochs} epoch(s), fewer than one step needs "
                                f"(world_size {world} x batch_size {self.batch_size} rows of "
                                f"seq_len {self.seq_len}, + 1)"
                            )
                        return
                    docs = self.source.documents(epoch, 0)
                    epoch_from_start, packed_this_epoch = True, 0
                    continue
                doc += 1
                stats["replaced_chars"] += document.replaced_chars
                packed_this_epoch += packer.push(
                    document.ids, document.prompt_len, document.trainable, document.positions
                )
            own = []
            for i in range(rows_per_step):
                if i % world == rank:
                    own.append(packer.pop_row())
                else:
                    packer.skip_row()
            rows += rows_per_step
            batch = collate_rows(
                own,
                eos_id=self.eos_id,
                position_ids=self.position_ids,
                mask_cross_document_labels=self.mask_cross_document_labels,
                answer_ids=self.pairs,
            )
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yielded += 1
            yield batch, _Snapshot(epoch, doc, rows, dict(stats), packer.view())


# Signals meant for the process (a scheduler's SIGTERM, Ctrl-C). Linux hands such a signal to any
# thread that does not block it; Python runs handlers only in the main thread, and it does so at
# once only when the signal lands there. So the loader's thread blocks them.
_ASYNC_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGALRM")


def _block_async_signals() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {getattr(signal, n) for n in _ASYNC_SIGNALS if hasattr(signal, n)})


class _Prefetcher:
    """Runs a generator in a daemon thread, ``depth`` items ahead; re-raises its errors."""

    def __init__(self, gen: Iterator[Any], depth: int) -> None:
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._empty = queue.Empty  # kept: close() may run at interpreter exit, after module teardown
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(gen,), name="nemo_lite-data", daemon=True)
        self._thread.start()

    def _run(self, gen: Any) -> None:
        _block_async_signals()
        try:
            for item in gen:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(("error", e))
        finally:
            gen.close()

    def _put(self, message: tuple[str, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> _Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        while True:
            if self._stop.is_set():
                raise RuntimeError(_SUPERSEDED)
            try:
                kind, value = self._queue.get(timeout=0.1)
                break
            except self._empty:
                continue
        if kind == "item":
            return value
        self._done = True
        if kind == "end":
            raise StopIteration
        raise value

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except self._empty:
                break
        self._thread.join(timeout=10)


def build_dataloader(cfg: DataConfig, *, split: str = "train", rank: int = 0, world_size: int = 1) -> PackedDataLoader:
    """The loader the trainer iterates: source -> tokenizer -> packer -> ``[B, S]`` batches.

    ``split="validation"`` reads the validation documents once, in order (no shuffle, one epoch).
    ``cfg.pin_memory=None`` pins when CUDA is available. A recipe's values (``tokenizer: model``,
    comma-separated sources) go through ``resolve_data_config`` first.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split={split!r}; choose 'train' or 'validation'")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    tokenizer = build_tokenizer(cfg)
    source = build_document_source(cfg, tokenizer, split=split)
    return PackedDataLoader(
        source,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        eos_id=source.encoder.eos_id,
        rank=rank,
        world_size=world_size,
        position_ids=cfg.position_ids,
        mask_cross_document_labels=cfg.mask_cross_document_labels,
        num_epochs=1 if split == "validation" else cfg.num_epochs,
        prefetch=cfg.prefetch,
        pin_memory=torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory,
        tokenizer=tokenizer,
        vocab_size=len(tokenizer),
        encoder=source.encoder,
    )
