"""Document sources through Hugging Face ``datasets``: local files or a hub dataset, in memory
(tokenized ahead, cached on disk) or streamed (tokenized on the fly).

``datasets`` and ``pyarrow`` are imported inside the functions, so the package imports with torch alone.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
from collections.abc import Iterator, Sequence
from fractions import Fraction
from itertools import islice
from typing import TYPE_CHECKING, Any

import torch

from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.default_chat import DEFAULT_CHAT_SOURCE, default_chat_file
from nemo_lite.components.datasets.default_corpus import default_corpus_file
from nemo_lite.components.datasets.default_preference import DEFAULT_PREFERENCE_SOURCE, default_preference_file
from nemo_lite.components.datasets.documents import Document, epoch_order
from nemo_lite.components.datasets.kinds import RecordEncoder, build_encoder

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
        if isinstance(spec, str) and spec == DEFAULT_PREFERENCE_SOURCE:
            self.files, self.format = [str(default_preference_file())], "json"
            self.description = "the default preference set"
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


def _load(spec: _Spec, cfg: DataConfig, hub_split: str, streaming: bool, features: Any = None) -> Any:
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
    kwargs: dict[str, Any] = {} if features is None else {"features": features}
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


def _whole_json_columns(raw: Any, encoder: RecordEncoder) -> Any:
    """The features to load ``raw`` (local JSON files) again with, or None when it needs no second load.

    A field whose records differ in type somewhere inside (one message with a number or a list as content, or
    an extra key) is typed by ``datasets`` as JSON at that place, and a string there that happens to parse as
    JSON ("42") is then stored as that JSON (the number 42): the record's own value is lost. Typing the whole
    field the encoder reads as JSON keeps every record's value exactly (a list or an object is always written
    out whole), so each record is checked on its own (``chat.read_column`` parses it back).
    """
    import datasets

    features = raw.features
    if features is None or not hasattr(datasets, "Json"):
        return None
    mixed = [f for f in getattr(encoder, "fields", ()) if f in features and _holds_json(features[f])]
    if not mixed or all(isinstance(features[f], datasets.Json) for f in mixed):
        return None
    return datasets.Features({k: datasets.Json() if k in mixed else v for k, v in features.items()})


def _holds_json(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, dict):
        return any(_holds_json(f) for f in feature.values())
    if isinstance(feature, list | tuple):
        return any(_holds_json(f) for f in feature)
    inner = getattr(feature, "feature", None)  # List, LargeList, Sequence
    return inner is not None and _holds_json(inner)


# -- the tokenizer's part of the cache key ----------------------------------------------------
def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\n{text}".encode()).hexdigest()


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
    """An in-memory (memory-mapped arrow) dataset tokenized ahead of training and cached on disk;
    ``encoder`` (the one that tokenized it) reads its rows back as documents."""

    def __init__(
        self,
        tokenized: datasets.Dataset,
        indices: Sequence[int],
        encoder: RecordEncoder,
        *,
        shuffle: bool,
        seed: int,
        description: str,
    ) -> None:
        self._ds = tokenized.with_format("arrow")
        self._indices = indices
        self.encoder = encoder
        self.shuffle, self.seed = shuffle, seed
        self.description = description
        self.has_prompts = encoder.has_prompts
        self.whole_documents = encoder.whole_documents
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
            yield from self.encoder.read(table)


class StreamingSource:
    """A streamed dataset, tokenized on the fly (in the loader's background thread).

    Order per epoch: the source order, minus/only the held-out documents, through a seeded
    shuffle buffer. Resuming at document ``start`` re-reads (without tokenizing) the documents
    before it.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        encoder: RecordEncoder,
        *,
        held_out: tuple[Fraction, bool],
        shuffle: bool,
        shuffle_buffer: int,
        seed: int,
        description: str,
    ) -> None:
        self._stream = stream.with_format("arrow")
        self.encoder = encoder
        self._fraction, self._want_held_out = held_out
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.description = description
        self.has_prompts = encoder.has_prompts
        self.whole_documents = encoder.whole_documents

    def _records(self) -> Iterator[tuple[int, tuple[Any, ...]]]:
        """(index in the source, the record's field values)."""
        index = 0
        for table in self._stream.iter(batch_size=_READ_CHUNK):
            for record in zip(*self.encoder.columns(table), strict=True):
                if self._fraction == 0 or _is_held_out(index, self._fraction) == self._want_held_out:
                    yield index, record
                index += 1

    def documents(self, epoch: int, start: int) -> Iterator[Document]:
        records: Iterator[tuple[int, tuple[Any, ...]]] = self._records()
        if self.shuffle:
            records = _shuffle_buffer(records, self.shuffle_buffer, f"nemo_lite/stream/{self.seed}/{epoch}")
        records = islice(records, start, None)
        while chunk := list(islice(records, _ENCODE_CHUNK)):
            yield from self.encoder.documents([r for _, r in chunk], [i for i, _ in chunk])


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
    """The documents of ``split`` ("train" or "validation") as a loader source; its ``encoder`` (of the
    record kind ``cfg`` chooses, ``kinds.build_encoder``) turns records into documents."""
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
    encoder = build_encoder(cfg, tokenizer, description=description)
    shuffle = cfg.shuffle and not validation

    raw = _load(spec, cfg, hub_split, cfg.streaming)
    if spec.hub_name is None and spec.format == "json" and (features := _whole_json_columns(raw, encoder)):
        raw = _load(spec, cfg, hub_split, cfg.streaming, features)
    if cfg.streaming:
        columns, features = raw.column_names, raw.features
        if columns is None:  # unknown until read: peek at the first record
            first = next(iter(raw.with_format("arrow").iter(batch_size=1)), None)
            if first is None:
                raise ValueError(f"no documents in {description}")
            columns, features = first.column_names, None
        encoder.check_columns(columns, features, description)
        return StreamingSource(
            raw,
            encoder,
            held_out=held_out,
            shuffle=shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            description=description,
        )

    if len(raw) == 0:
        raise ValueError(f"no documents in {description}")
    encoder.check_columns(raw.column_names, raw.features, description)
    tokenized = _tokenize(raw, encoder, cfg, description)
    if not (validation and fraction > 0):  # what tokenizing changed, told once: both splits share one tokenizing
        encoder.report(tokenized, spec.description)
    indices = _split_indices(len(tokenized), held_out[0], held_out[1])
    if len(indices) == 0:
        raise ValueError(
            f"no documents in {description} ({len(tokenized)} documents, validation_fraction={cfg.validation_fraction})"
        )
    return TokenizedSource(tokenized, indices, encoder, shuffle=shuffle, seed=cfg.seed, description=description)


def _tokenize(raw: datasets.Dataset, encoder: RecordEncoder, cfg: DataConfig, description: str) -> datasets.Dataset:
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
    return tokenized
