"""Record kinds: the ``RecordEncoder`` protocol and the table ``DataConfig.kind -> encoder class``.

A record kind says how one record of a source (a row of a json/parquet/csv file, a line of text, a
hub dataset row) becomes a ``Document`` (token ids, and which of them the loss may target), where a
document ends in the packed rows, and how a prompt is encoded when the trained model is sampled.
Built in: ``text`` (plain text or prompt/response pairs, ``text.py``), ``chat`` (conversations
rendered with a chat template, ``chat.py``) and ``token_ids`` (pre-tokenized ids, ``token_ids.py``).
A new kind is one class implementing :class:`RecordEncoder`, registered with
``@register_record_kind("name")`` and chosen with ``data.kind: name`` (docs/data.md, "Record kinds").

Importing ``nemo_lite.components.datasets`` registers the built-in kinds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.documents import Document
from nemo_lite.errors import NemoLiteError
from nemo_lite.registry import Registry


class RecordEncoder(Protocol):
    """Records of one kind -> ``Document``; what the sources, the loader and sampling read.

    One encoder is built per source by :func:`build_encoder`. It must pickle: ``datasets.map`` runs
    ``__call__`` in worker processes. "A table" below is a ``pyarrow.Table`` (a batch of rows).

    In memory, the source calls ``check_columns``, then ``__call__`` over the whole dataset (the
    result, with ``features()`` as its schema, is cached on disk under ``cache_key()``), then
    ``report``; each epoch it turns rows of that tokenized table back into documents with ``read``.
    Streaming, it calls ``check_columns``, takes each record's values with ``columns`` and encodes
    them with ``documents`` on the fly.
    """

    kind: ClassVar[str]  # the name it is registered under (set by register_record_kind)
    tokenizer: Any  # the Hugging Face tokenizer; its definition is part of the cache key
    eos_id: int  # the id that ends every document in the packed rows (the attention masks' EOS)
    end_id: int  # where generation stops: the EOS, or e.g. the end of a chat turn
    has_prompts: bool  # documents may carry prompt_len > 0 or a trainable mask
    whole_documents: bool  # no document may be cut by a row boundary (the packer pads the row instead)
    sample_prompt: str  # what the end-of-run sample starts from when trainer.sample_prompt is unset

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, *, description: str) -> RecordEncoder:
        """The encoder for ``cfg`` (its fields, ``eos_id`` rule, options); ``description`` names the source in
        messages ("'data/a.jsonl' (1 json file), train split"). ValueError (one line) for a config it cannot
        serve (a missing field setting, a tokenizer without what the kind needs)."""
        ...

    def check_columns(self, columns: Sequence[str], features: Any, description: str) -> None:
        """ValueError (one line, naming the column and the ``DataConfig`` key to set) when the source's
        ``columns`` cannot be read as this kind. ``features`` is the source's ``datasets.Features``, or None
        when unknown (a stream whose first record was peeked at)."""
        ...

    def columns(self, table: Any) -> list[list[Any]]:
        """The values the encoder reads from ``table``: one Python list per column it reads (in a fixed
        order), each with one value per row. ``documents`` takes the records these lists zip into."""
        ...

    def documents(self, records: Sequence[tuple[Any, ...]], indices: Sequence[int]) -> list[Document]:
        """Streaming: ``records`` (tuples of ``columns`` values, one per record) -> one ``Document`` per record,
        in order; ``indices`` are the records' positions in the source (for messages). A record with nothing
        to train on gives a document with no ids (the packer skips it)."""
        ...

    def __call__(self, table: Any, indices: list[int]) -> dict[str, list[Any]]:
        """``datasets.map`` (batched): the rows of ``table`` -> one list per key of ``features()``, one value
        per row (``input_ids`` among them). ``indices`` are the rows' positions in the source."""
        ...

    def features(self) -> Any:
        """The ``datasets.Features`` of what ``__call__`` returns: the schema of the cached tokenized table."""
        ...

    def read(self, table: Any) -> list[Document]:
        """Rows of the tokenized table (``features()`` columns) -> one ``Document`` per row, in order."""
        ...

    def cache_key(self) -> str:
        """Every option that changes what ``__call__`` returns (fields, flags, template), with a version tag;
        the tokenizer and the raw data are added to the cache key by the source."""
        ...

    def report(self, tokenized: Any, description: str) -> None:
        """Warn (``warnings.warn``) about what tokenizing changed, from the tokenized ``datasets.Dataset``:
        replaced characters, cut or empty documents. Nothing to say: nothing."""
        ...

    def prompt_ids(self, text: str) -> list[int]:
        """``text`` as the ids that start a sample of the trained model: the text itself, or e.g. one user turn
        rendered with the chat template and its generation prompt. Never empty."""
        ...


class UnknownRecordKindError(NemoLiteError, ValueError):
    pass


KINDS: Registry[type[RecordEncoder]] = Registry("record kind", attribute="kind")


def register_record_kind(name: str):
    """Class decorator: make the encoder class selectable as ``data.kind: <name>``."""
    return KINDS.register(name)


def unregister_record_kind(name: str) -> None:
    """Remove a kind (for tests that register temporary ones)."""
    KINDS.unregister(name)


def list_record_kinds() -> list[str]:
    return KINDS.names()


def record_kind(cfg: DataConfig) -> str:
    """``cfg.kind``; when unset, ``"chat"`` if ``messages_field`` is set, else ``"text"``."""
    if cfg.kind is not None:
        return cfg.kind
    return "chat" if cfg.messages_field is not None else "text"


def build_encoder(cfg: DataConfig, tokenizer: Any, *, description: str) -> RecordEncoder:
    """The one place a record kind is chosen: the encoder of ``record_kind(cfg)`` for one source."""
    name = record_kind(cfg)
    encoder_cls = KINDS.get(name)
    if encoder_cls is None:
        raise UnknownRecordKindError(
            f"unknown record kind DataConfig.kind={name!r}; registered kinds: {', '.join(list_record_kinds())}"
        )
    if cfg.shared_prompt and not getattr(encoder_cls, "pairs", False):
        raise ValueError(
            f"DataConfig.shared_prompt=true packs preference pairs, which kind {name!r} does not read; set "
            "DataConfig.kind=preference or shared_prompt=false"
        )
    return encoder_cls.from_config(cfg, tokenizer, description=description)
