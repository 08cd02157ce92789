"""Document sources through Hugging Face ``datasets``: local files or a hub dataset, in memory
(tokenized ahead, cached on disk) or streamed (tokenized on the fly).

``datasets`` and ``pyarrow`` are imported inside the functions, so the package imports with torch alone.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import warnings
from collections.abc import Iterable, Iterator, Sequence
from fractions import Fraction
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from nemo_lite.components.datasets.chat import ChatEncoder, chat_delimiter_id, chat_template_of
from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.default_chat import DEFAULT_CHAT_SOURCE, default_chat_file
from nemo_lite.components.datasets.default_corpus import default_corpus_file
from nemo_lite.components.datasets.documents import Document, epoch_order

if TYPE_CHECKING:
    import datasets

_FORMAT_OF_EXTENSION = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zstd", ".lz4")
_READ_CHUNK = 1024  # documents fetched from arrow at a time
_ENCODE_CHUNK = 256  # documents tokenized together when streaming
_MAP_BATCH = 1000
_TOKENIZED_VERSION = "nemo_lite-tokenized-v1"


# -- resolving `source` -----------------------------------------------------------------------
def _extension(path: str) -> str:
    root, ext = os.path.splitext(path.lower())
    if ext in _COMPRESSIONS:
        ext = os.path.splitext(root)[1]
    return ext


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or _extension(spec) in _FORMAT_OF_EXTENSION


def _local_files(spec: str) -> list[str] | None:
    """The files a local spec names; None when ``spec`` is not local (a hub name)."""
    path = os.path.expanduser(spec)
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(
                f"data source glob {spec!r} matched no file (relative to {os.getcwd()!r}); give an existing "
                "file, a directory, a glob such as 'data/*.jsonl', or a list of them"
            )
        return files
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if _extension(f) in _FORMAT_OF_EXTENSION
        )
        if not files:
            raise FileNotFoundError(
                f"data directory {spec!r} has no data files (extensions {sorted(_FORMAT_OF_EXTENSION)})"
            )
        return files
    if os.path.isfile(path):
        return [path]
    if _looks_like_path(spec):
        raise FileNotFoundError(
            f"data file {spec!r} does not exist (relative to {os.getcwd()!r}); give an existing file, a "
            "directory, a glob such as 'data/*.jsonl', or a list of them"
        )
    return None


def _files_format(files: list[str], data_format: str | None) -> str:
    if data_format is not None:
        return data_format
    formats = {f: _FORMAT_OF_EXTENSION.get(_extension(f)) for f in files}
    unknown = [f for f, fmt in formats.items() if fmt is None]
    if unknown:
        raise ValueError(
            f"cannot tell the format of {unknown[:3]} from the extension; known extensions are "
            f"{sorted(_FORMAT_OF_EXTENSION)} (optionally compressed), or set DataConfig.data_format"
        )
    kinds = sorted(set(formats.values()))
    if len(kinds) > 1:
        raise ValueError(f"data files mix formats {kinds}; give files of one format per source")
    return kinds[0]


class _Spec:
    """A resolved source: local files of one format, or a hub dataset."""

    def __init__(self, spec: str | Sequence[str], cfg: DataConfig) -> None:
        self.hub_name: str | None = None
        self.files: list[str] = []
        self.format = ""
        if isinstance(spec, str) and spec == "default":
            self.files, self.format = [str(default_corpus_file())], "json"
            self.description = "the default corpus"
            return
        if isinstance(spec, str) and spec == DEFAULT_CHAT_SOURCE:
            self.files, self.format = [str(default_chat_file())], "json"
            self.description = "the default conversation set"
            return
        specs = [spec] if isinstance(spec, str) else list(spec)
        if not specs:
            raise ValueError("DataConfig.source is an empty list")
        resolved = [(s, _local_files(s)) for s in specs]
        hubs = [s for s, files in resolved if files is None]
        if hubs and len(specs) > 1:
            raise FileNotFoundError(f"data files {hubs} do not exist (a list of sources must be local files)")
        if hubs:
            self.hub_name = hubs[0]
            self.description = f"hub dataset {self.hub_name!r}" + (f" ({cfg.hub_config})" if cfg.hub_config else "")
            return
        self.files = [f for _, files in resolved for f in files or []]
        self.format = _files_format(self.files, cfg.data_format)
        shown = repr(specs[0]) if len(specs) == 1 else f"{specs[0]!r} and {len(specs) - 1} more"
        self.description = f"{shown} ({len(self.files)} {self.format} file{'s' * (len(self.files) > 1)})"


def _load(spec: _Spec, cfg: DataConfig, hub_split: str, streaming: bool) -> Any:
    import datasets

    if spec.hub_name is not None:
        try:
            return datasets.load_dataset(
                spec.hub_name, cfg.hub_config, split=hub_split, streaming=streaming, cache_dir=cfg.cache_dir
            )
        except Exception as e:
            raise ValueError(
                f"source {spec.hub_name!r} is not a local file, directory or glob, so it was loaded as a Hugging "
                f"Face hub dataset (split {hub_split!r}), which failed: {type(e).__name__}: {e}"
            ) from e
    if all(os.path.getsize(f) == 0 for f in spec.files):
        raise ValueError(f"no documents in {spec.description}: the files are empty")
    kwargs: dict[str, Any] = {}
    if spec.format == "text":  # undecodable bytes become U+FFFD instead of an error mid-run
        kwargs = {"sample_by": cfg.text_sample_by, "encoding_errors": "replace"}
    try:
        return datasets.load_dataset(
            spec.format,
            data_files=spec.files,
            split="train",
            streaming=streaming,
            cache_dir=cfg.cache_dir,
            **kwargs,
        )
    except Exception as e:
        raise ValueError(f"could not read {spec.description}: {type(e).__name__}: {e}") from e


# -- text -> ids ------------------------------------------------------------------------------
def _column_texts(column: Any) -> list[str]:
    """An arrow string column as Python strings; invalid UTF-8 (which pyarrow's json and parquet
    readers let through) is replaced with U+FFFD instead of raising; null -> ""."""
    import pyarrow as pa

    try:
        values = column.to_pylist()
    except UnicodeDecodeError:
        values = [None if b is None else b.decode("utf-8", "replace") for b in column.cast(pa.binary()).to_pylist()]
    return ["" if v is None else v for v in values]


class _Encoder:
    """Text columns -> (ids, prompt_len, replaced_chars) per document. Picklable (datasets.map).

    The sources read an encoder through ``fields``, ``columns`` (a table's values), ``documents``
    (records -> Documents, streaming), ``__call__`` (datasets.map), ``features``, ``cache_key`` and
    ``report``; ``chat.ChatEncoder`` is the other one (conversations).
    """

    def __init__(self, tokenizer: Any, fields: list[str], *, parse_special_tokens: bool, mask_prompt: bool) -> None:
        self.tokenizer = tokenizer
        self.fields = fields
        self.parse_special_tokens = parse_special_tokens
        self.mask_prompt = mask_prompt

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(
            texts,
            add_special_tokens=False,
            split_special_tokens=not self.parse_special_tokens,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]

    def encode_columns(self, columns: list[list[str]]) -> tuple[list[list[int]], list[int], list[int]]:
        replaced = [sum(text.count("\ufffd") for text in texts) for texts in zip(*columns, strict=True)]
        if len(columns) == 1:
            ids = self._encode(columns[0])
            return ids, [0] * len(ids), replaced
        prompts, responses = self._encode(columns[0]), self._encode(columns[1])
        ids = [p + r for p, r in zip(prompts, responses, strict=True)]
        prompt_lens = [len(p) if self.mask_prompt else 0 for p in prompts]
        return ids, prompt_lens, replaced

    def columns(self, table: Any) -> list[list[str]]:
        return [_column_texts(table.column(f)) for f in self.fields]

    def documents(self, records: Sequence[tuple[str, ...]], indices: Sequence[int]) -> list[Document]:
        ids, prompt_lens, replaced = self.encode_columns([list(c) for c in zip(*records, strict=True)])
        return [Document(ids[k], prompt_lens[k], replaced[k]) for k in range(len(ids))]

    def __call__(self, table: Any, indices: list[int]) -> dict[str, list]:
        ids, prompt_lens, replaced = self.encode_columns(self.columns(table))
        return {"input_ids": ids, "prompt_len": prompt_lens, "replaced_chars": replaced}

    def features(self) -> Any:
        import datasets

        return datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "prompt_len": datasets.Value("int32"),
                "replaced_chars": datasets.Value("int32"),
            }
        )

    def cache_key(self) -> str:
        return "\n".join([_TOKENIZED_VERSION, repr(self.fields), repr((self.parse_special_tokens, self.mask_prompt))])

    def report(self, tokenized: Any, description: str) -> None:
        import pyarrow.compute as pc

        replaced = pc.sum(tokenized.data.column("replaced_chars")).as_py() or 0
        if replaced:
            warnings.warn(
                f"{description}: {replaced} characters are U+FFFD (undecodable bytes replaced, or already in the text)",
                stacklevel=3,
            )


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


def _check_fields(columns: Iterable[str] | None, features: Any, fields: list[str], description: str) -> None:
    if columns is None:
        return
    columns = list(columns)
    for f in fields:
        if f not in columns:
            key = "text_field" if len(fields) == 1 else "prompt_field/response_field"
            raise ValueError(
                f"field {f!r} is not in {description}; its fields are {columns}. Set DataConfig.{key} to "
                "the field that holds the text"
            )
        feature = features[f] if features is not None else None
        dtype = getattr(feature, "dtype", "string")
        if dtype not in ("string", "large_string"):
            raise ValueError(f"field {f!r} of {description} holds {feature}, not text")


def _check_messages_field(columns: Iterable[str] | None, features: Any, fields: list[str], description: str) -> None:
    """The messages column exists and holds lists (each conversation's messages are checked when encoded)."""
    if columns is None:
        return
    columns = list(columns)
    field = fields[0]
    if field not in columns:
        raise ValueError(
            f"field {field!r} is not in {description}; its fields are {columns}. Set DataConfig.messages_field to "
            "the field that holds each conversation's messages"
        )
    feature = features[field] if features is not None else None
    if feature is not None and not isinstance(feature, list) and not hasattr(feature, "feature"):
        raise ValueError(
            f"field {field!r} of {description} holds {feature}, not lists of {{'role', 'content'}} messages"
        )


# -- held-out validation documents ------------------------------------------------------------
def _held_out_fraction(fraction: float) -> Fraction:
    return Fraction(fraction).limit_denominator(1_000_000)


def _is_held_out(index: int, fraction: Fraction) -> bool:
    """Evenly spaced: document i is held out when floor((i+1) f) > floor(i f)."""
    p, q = fraction.numerator, fraction.denominator
    return ((index + 1) * p) // q != (index * p) // q


def _split_indices(n: int, fraction: Fraction, held_out: bool) -> Sequence[int]:
    if fraction == 0:
        return range(n) if not held_out else []
    i = torch.arange(n, dtype=torch.int64)
    p, q = fraction.numerator, fraction.denominator
    mask = ((i + 1) * p) // q != (i * p) // q
    return (mask if held_out else ~mask).nonzero().flatten().tolist()


# -- the two document sources -----------------------------------------------------------------
class TokenizedSource:
    """An in-memory (memory-mapped arrow) dataset tokenized ahead of training and cached on disk."""

    def __init__(
        self,
        tokenized: datasets.Dataset,
        indices: Sequence[int],
        *,
        shuffle: bool,
        seed: int,
        description: str,
        has_prompts: bool,
        whole_documents: bool = False,
    ) -> None:
        self._ds = tokenized.with_format("arrow")
        self._indices = indices
        self.shuffle, self.seed = shuffle, seed
        self.description = description
        self.has_prompts = has_prompts
        self.whole_documents = whole_documents
        self._order_cache: tuple[int, Sequence[int]] | None = None

    @property
    def num_documents(self) -> int:
        return len(self._indices)

    def _order(self, epoch: int) -> Sequence[int]:
        if not self.shuffle:
            return self._indices
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = epoch_order(len(self._indices), epoch, self.seed)
            self._order_cache = (epoch, [self._indices[j] for j in perm])
        return self._order_cache[1]

    def documents(self, epoch: int, start: int) -> Iterator[Document]:
        order = self._order(epoch)
        for j in range(start, len(order), _READ_CHUNK):
            chunk = order[j : j + _READ_CHUNK]
            if isinstance(chunk, range) and chunk.step == 1:
                table = self._ds[chunk.start : chunk.stop]
            else:
                table = self._ds[list(chunk)]
            ids = table.column("input_ids").to_pylist()
            if "trainable" in table.column_names:  # conversations
                for doc_ids, trainable in zip(ids, table.column("trainable").to_pylist(), strict=True):
                    yield Document(doc_ids, 0, 0, trainable)
                continue
            prompt_lens = table.column("prompt_len").to_pylist()
            replaced = table.column("replaced_chars").to_pylist()
            for k in range(len(ids)):
                yield Document(ids[k], prompt_lens[k], replaced[k])


class StreamingSource:
    """A streamed dataset, tokenized on the fly (in the loader's background thread).

    Order per epoch: the source order, minus/only the held-out documents, through a seeded
    shuffle buffer. Resuming at document ``start`` re-reads (without tokenizing) the documents
    before it.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        encoder: Any,
        *,
        held_out: tuple[Fraction, bool],
        shuffle: bool,
        shuffle_buffer: int,
        seed: int,
        description: str,
        has_prompts: bool,
        whole_documents: bool = False,
    ) -> None:
        self._stream = stream.with_format("arrow")
        self._encoder = encoder
        self._fraction, self._want_held_out = held_out
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.description = description
        self.has_prompts = has_prompts
        self.whole_documents = whole_documents

    def _records(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(index in the source, the record's field values)."""
        index = 0
        for table in self._stream.iter(batch_size=_READ_CHUNK):
            for record in zip(*self._encoder.columns(table), strict=True):
                if self._fraction == 0 or _is_held_out(index, self._fraction) == self._want_held_out:
                    yield index, record
                index += 1

    def documents(self, epoch: int, start: int) -> Iterator[Document]:
        records: Iterator[tuple[int, tuple[Any, ...]]] = self._records()
        if self.shuffle:
            records = _shuffle_buffer(records, self.shuffle_buffer, f"nemo_lite/stream/{self.seed}/{epoch}")
        records = islice(records, start, None)
        while chunk := list(islice(records, _ENCODE_CHUNK)):
            yield from self._encoder.documents([r for _, r in chunk], [i for i, _ in chunk])


def _shuffle_buffer(items: Iterator[Any], size: int, seed: str) -> Iterator[Any]:
    rng = random.Random(seed)
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# -- building ---------------------------------------------------------------------------------
def build_document_source(
    cfg: DataConfig, tokenizer: Any, *, split: str = "train"
) -> TokenizedSource | StreamingSource:
    """The documents of ``split`` ("train" or "validation") as a loader source."""
    fraction = _held_out_fraction(cfg.validation_fraction)
    validation = split == "validation"
    if not validation or fraction > 0:
        spec, hub_split, held_out = _Spec(cfg.source, cfg), cfg.train_split, (fraction, validation)
    elif cfg.validation_source is not None:
        spec, hub_split, held_out = _Spec(cfg.validation_source, cfg), cfg.validation_split, (Fraction(0), False)
    else:
        spec = _Spec(cfg.source, cfg)
        if spec.hub_name is None:
            raise ValueError(
                f"no validation data for {spec.description}: set DataConfig.validation_fraction (e.g. 0.01) to "
                "hold out part of it, or DataConfig.validation_source"
            )
        hub_split, held_out = cfg.validation_split, (Fraction(0), False)
    description = spec.description + (f", {split} split" if fraction > 0 or validation else "")
    encoder: Any
    if cfg.messages_field is not None:  # conversations: each one whole in a row, loss on the assistant only
        template = chat_template_of(tokenizer, cfg.chat_template)
        fields = [cfg.messages_field]
        encoder = ChatEncoder(
            tokenizer,
            cfg.messages_field,
            template=template,
            delimiter_id=chat_delimiter_id(tokenizer, template, cfg.eos_id),
            max_tokens=cfg.seq_len - 1,
            description=description,
        )
        has_prompts = whole_documents = True
    else:
        fields = [cfg.prompt_field, cfg.response_field] if cfg.prompt_field else [cfg.text_field]
        encoder = _Encoder(
            tokenizer, fields, parse_special_tokens=cfg.parse_special_tokens, mask_prompt=cfg.mask_prompt_labels
        )
        has_prompts = cfg.prompt_field is not None and cfg.mask_prompt_labels
        whole_documents = False
    check_fields = _check_messages_field if cfg.messages_field is not None else _check_fields
    shuffle = cfg.shuffle and not validation

    raw = _load(spec, cfg, hub_split, cfg.streaming)
    if cfg.streaming:
        columns, features = raw.column_names, raw.features
        if columns is None:  # unknown until read: peek at the first record
            first = next(iter(raw.with_format("arrow").iter(batch_size=1)), None)
            if first is None:
                raise ValueError(f"no documents in {description}")
            columns, features = first.column_names, None
        check_fields(columns, features, fields, description)
        return StreamingSource(
            raw,
            encoder,
            held_out=held_out,
            shuffle=shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            description=description,
            has_prompts=has_prompts,
            whole_documents=whole_documents,
        )

    if len(raw) == 0:
        raise ValueError(f"no documents in {description}")
    check_fields(raw.column_names, raw.features, fields, description)
    tokenized = _tokenize(raw, encoder, cfg, description)
    indices = _split_indices(len(tokenized), held_out[0], held_out[1])
    if len(indices) == 0:
        raise ValueError(
            f"no documents in {description} ({len(tokenized)} documents, validation_fraction={cfg.validation_fraction})"
        )
    return TokenizedSource(
        tokenized,
        indices,
        shuffle=shuffle,
        seed=cfg.seed,
        description=description,
        has_prompts=has_prompts,
        whole_documents=whole_documents,
    )


def _tokenize(raw: datasets.Dataset, encoder: Any, cfg: DataConfig, description: str) -> datasets.Dataset:
    """Tokenize every document once (batched, ``num_proc`` processes), cached by datasets.

    The cache key is our own: the raw data's fingerprint, the tokenizer's full definition and the
    encoder's options, so a warm run finds the ids without hashing a tokenizer object.
    """
    key = "\n".join([raw._fingerprint, _tokenizer_fingerprint(encoder.tokenizer), encoder.cache_key()])
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:32]
    num_proc = cfg.num_proc or min(8, os.cpu_count() or 1)
    num_proc = max(1, min(num_proc, len(raw) // (2 * _MAP_BATCH)))
    tokenized = raw.with_format("arrow").map(
        encoder,
        batched=True,
        with_indices=True,
        batch_size=_MAP_BATCH,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=raw.column_names,
        features=encoder.features(),
        new_fingerprint=fingerprint,
        desc=f"Tokenizing {description}",
    )
    encoder.report(tokenized, description)
    return tokenized
