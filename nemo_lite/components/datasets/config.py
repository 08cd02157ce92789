"""``DataConfig``: every key of the data pipeline, in one keyword-only dataclass.

It is also the schema of a recipe's ``data:`` group: Hydra composes the YAML onto this class, so
every field can be set from ``configs/data/*.yaml`` and the command line, and the defaults below are
the recipe's defaults. Hence only OmegaConf-compatible types (no unions beyond Optional): ``source``
and ``validation_source`` are ``Any`` (a string or a list of strings, checked in ``__post_init__``).
Each field's comment says what it does; ``docs/data.md`` has the same table with examples.

:func:`resolve_data_config` turns the recipe-level conveniences (``tokenizer: model``, comma-separated
sources, ``pin_memory: null``) into what the loader reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemo_lite.errors import ConfigError

DATA_FORMATS = ("text", "json", "parquet", "csv")
TEXT_SAMPLE_BY = ("line", "paragraph", "document")
# `tokenizer: model` in a recipe: the fine-tuned checkpoint's own tokenizer (model.pretrained_path).
MODEL_TOKENIZER = "model"


@dataclass(kw_only=True)
class DataConfig:
    # --- where the documents come from -------------------------------------------------------
    # "default" (the built-in corpus, see docs/data.md), a local file, directory or glob
    # ("data/*.jsonl"), a list of those, or a Hugging Face hub dataset name ("org/name").
    # Type: str or list of str (Any only because OmegaConf has no str-or-list type). In a recipe,
    # "a.jsonl,b.jsonl" is also a list (resolve_data_config splits it).
    source: Any = "default"
    # Format of local files: one of DATA_FORMATS; None = from the extension (.txt/.md -> text,
    # .json/.jsonl -> json, .parquet -> parquet, .csv -> csv; .gz/.zst/.bz2/.xz are looked through).
    data_format: str | None = None
    # Record kind: how a record becomes a document, registered by name in kinds.py ("text": a text
    # column or prompt/response columns; "chat": a column of conversations; "token_ids": pre-tokenized
    # {"input_ids": [...]} records; docs/data.md, "Record kinds"). None = "chat" when messages_field
    # is set, else "text".
    kind: str | None = None
    # Column (field) that holds a document's text. For text files it is always "text".
    text_field: str = "text"
    # Fine-tuning data: a prompt column and a response column. A document is then
    # prompt tokens + response tokens + EOS. Set both or neither; text_field is then unused.
    prompt_field: str | None = None
    response_field: str | None = None
    # With prompt/response fields: the prompt tokens get label -100 (no loss on the prompt).
    mask_prompt_labels: bool = True
    # Conversations: a column of messages ([{"role": ..., "content": ...}, ...], the Hugging Face chat
    # format), rendered with the tokenizer's chat template. Loss on the assistant's tokens only; each
    # conversation whole in one row, cut at seq_len - 1 tokens (docs/finetuning.md). Excludes
    # prompt_field/response_field; text_field is then unused.
    messages_field: str | None = None
    # Preference pairs (kind: preference, docs/preference.md): the prompt column (prompt_field, default
    # "prompt") and the two answer columns, plain text or conversations as TRL documents them.
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    # Preference pairs: pack prompt, chosen, rejected once, the rejected answer masked from the chosen one
    # (needs attention.attn_mask_type=shared_prompt); false: prompt + chosen, then prompt + rejected.
    shared_prompt: bool = False
    # With messages_field or kind preference: a Jinja chat template file that replaces the tokenizer's own, or
    # the name of one nemo_lite ships (nemo_lite/assets/chat_templates/<name>.jinja: a stock template with
    # {% generation %} blocks); None = the tokenizer's.
    chat_template: str | None = None
    # Text files: one document per "line", per "paragraph" (blank-line separated) or per file
    # ("document").
    text_sample_by: str = "line"
    # Hub datasets only: the dataset's configuration name (the second argument of load_dataset).
    hub_config: str | None = None
    # Split names read for split="train" / split="validation" from a hub dataset. Local files form
    # a single split; use validation_source or validation_fraction for them.
    train_split: str = "train"
    validation_split: str = "validation"
    # Separate validation data (same forms as `source`). Needs validation_fraction: 0 (setting both
    # is an error: the two are different validation sets).
    validation_source: Any = None
    # Hold out this fraction of the source's documents for validation (0 = none). The held-out
    # documents are evenly spaced by their index in the source, so the choice is deterministic
    # and the same in streaming and in-memory mode.
    validation_fraction: float = 0.02
    # Stream the source instead of loading it: nothing is cached on disk, documents are
    # tokenized on the fly in the loader's background thread. For data that does not fit.
    streaming: bool = False
    # Documents buffered for shuffling in streaming mode (in-memory mode permutes all of them).
    shuffle_buffer: int = 10_000

    # --- tokenization ------------------------------------------------------------------------
    # "default" (the byte-level BPE shipped for the default corpus), a directory with a Hugging
    # Face tokenizer, a tokenizer.json file, or a hub tokenizer name. In a recipe also "model": the
    # checkpoint's own tokenizer (model.pretrained_path; resolve_data_config fills in the path).
    tokenizer: str = "default"
    # Id of the token that ends each document; None = the tokenizer's eos_token_id. With
    # messages_field: None = a token the chat template never writes (docs/finetuning.md has the rule).
    eos_id: int | None = None
    # Treat special-token strings in the text ("<|im_start|>", "<|endoftext|>") as special tokens.
    # Off by default: raw text is text, so a literal "<|endoftext|>" cannot end a document early.
    # Turn on for chat-formatted fine-tuning data whose template uses special tokens.
    parse_special_tokens: bool = False
    # Processes for the ahead-of-time tokenization (datasets.map); None = all cores, at most 8.
    num_proc: int | None = None
    # Cache directory of Hugging Face datasets (raw arrow files and tokenized ids);
    # None = the datasets default (HF_DATASETS_CACHE).
    cache_dir: str | None = None

    # --- packing -----------------------------------------------------------------------------
    # Tokens per row. Each row is cut from the stream as seq_len + 1 tokens; input_ids are the
    # first seq_len, labels the last seq_len.
    seq_len: int = 256
    # Rows per batch, per data-parallel rank.
    batch_size: int = 8
    # True: position_ids restart at 0 after every EOS (a document cut by a row boundary carries
    # on counting in the next row). False: position_ids are 0..seq_len-1 in every row.
    position_ids: bool = True
    # True: the label of an EOS position (the next document's first token) is -100.
    mask_cross_document_labels: bool = False

    # --- order and epochs --------------------------------------------------------------------
    # Shuffle the document order, deterministically from `seed` (a new order every epoch).
    # split="validation" never shuffles.
    shuffle: bool = True
    seed: int = 0
    # Passes over the source before the loader stops; None = loop forever (pretraining).
    # split="validation" always makes one pass.
    num_epochs: int | None = None

    # --- loader ------------------------------------------------------------------------------
    # Batches prepared ahead by the loader's background thread; 0 = build each batch on demand.
    prefetch: int = 2
    # Put batches in pinned memory (for non_blocking copies to the GPU); ignored, with a warning,
    # without CUDA. None = auto: the trainer pins when it trains on CUDA (resolve_data_config), a
    # loader built directly pins when CUDA is available.
    pin_memory: bool | None = None

    def __post_init__(self) -> None:
        _check_source("source", self.source)
        if self.validation_source is not None:
            _check_source("validation_source", self.validation_source)
        if self.data_format is not None and self.data_format not in DATA_FORMATS:
            raise ConfigError(f"DataConfig.data_format={self.data_format!r}; choose one of {list(DATA_FORMATS)}")
        if self.text_sample_by not in TEXT_SAMPLE_BY:
            raise ConfigError(
                f"DataConfig.text_sample_by={self.text_sample_by!r}; choose one of {list(TEXT_SAMPLE_BY)}"
            )
        if self.kind != "preference" and (self.prompt_field is None) != (self.response_field is None):
            raise ConfigError(
                "DataConfig.prompt_field and response_field go together: set both (fine-tuning data) "
                f"or neither, got prompt_field={self.prompt_field!r}, response_field={self.response_field!r}"
            )
        if self.messages_field is not None and self.prompt_field is not None:
            raise ConfigError(
                f"DataConfig.messages_field={self.messages_field!r} (conversations) and prompt_field/response_field "
                "(prompt/response pairs) are two kinds of fine-tuning data; set one of them"
            )
        if self.chat_template is not None and self.messages_field is None and self.kind != "preference":
            raise ConfigError(
                f"DataConfig.chat_template={self.chat_template!r} renders conversations; set messages_field too"
            )
        _check_int("seq_len", self.seq_len, 1)
        _check_int("batch_size", self.batch_size, 1)
        _check_int("prefetch", self.prefetch, 0)
        _check_int("shuffle_buffer", self.shuffle_buffer, 1)
        _check_int("seed", self.seed, None)
        if self.num_proc is not None:
            _check_int("num_proc", self.num_proc, 1)
        if self.num_epochs is not None:
            _check_int("num_epochs", self.num_epochs, 1)
        if self.eos_id is not None:
            _check_int("eos_id", self.eos_id, 0)
        if not 0.0 <= float(self.validation_fraction) < 1.0:
            raise ConfigError(f"DataConfig.validation_fraction={self.validation_fraction!r}; it must be in [0, 1)")
        if self.validation_source is not None and self.validation_fraction > 0:
            raise ConfigError(
                f"DataConfig.validation_source={self.validation_source!r} and validation_fraction="
                f"{self.validation_fraction} both choose validation data; set validation_fraction=0 to "
                "validate on validation_source"
            )


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an int" if minimum is None else f"an int >= {minimum}"
        raise ConfigError(f"DataConfig.{name} must be {bound}, got {value!r}")


def _check_source(name: str, value: object) -> None:
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"DataConfig.{name} is empty; give 'default', a path, a glob or a hub name")
        return
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"DataConfig.{name} must be a string or a list of non-empty strings, got {value!r}")
    if not value:
        raise ConfigError(f"DataConfig.{name} is an empty list")


def _split_commas(value: Any) -> Any:
    if isinstance(value, str) and "," in value:
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def resolve_data_config(cfg: DataConfig, *, pretrained_path: str | None, pin_memory: bool) -> DataConfig:
    """The config the loader reads, from a recipe's ``data:`` values (a new DataConfig).

    - ``tokenizer="model"`` -> ``pretrained_path`` (the checkpoint's own tokenizer); ConfigError
      when there is no pretrained path.
    - ``source`` / ``validation_source`` ``"a.jsonl,b.jsonl"`` -> ``["a.jsonl", "b.jsonl"]``.
    - ``pin_memory=None`` (auto) -> ``pin_memory``: the trainer passes ``device.type == "cuda"``.
    """
    tokenizer = cfg.tokenizer
    if tokenizer == MODEL_TOKENIZER:
        if pretrained_path is None:
            raise ConfigError("data.tokenizer=model needs model.pretrained_path (a directory with a tokenizer)")
        tokenizer = str(Path(pretrained_path).expanduser())
    return dataclasses.replace(
        cfg,
        tokenizer=tokenizer,
        source=_split_commas(cfg.source),
        validation_source=_split_commas(cfg.validation_source),
        pin_memory=pin_memory if cfg.pin_memory is None else cfg.pin_memory,
    )
