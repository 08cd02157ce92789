"""The ``text`` record kind: a text column, or a prompt column and a response column.

A document is the text's tokens (``add_special_tokens=False``, no BOS), or prompt tokens + response
tokens with the prompt masked from the loss (``mask_prompt_labels``); the packer appends the EOS.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.documents import Document
from nemo_lite.components.datasets.kinds import register_record_kind
from nemo_lite.components.datasets.tokenizer import resolve_eos_id

TEXT_TOKENIZED_VERSION = "nemo_lite-tokenized-v1"


def _column_texts(column: Any) -> list[str]:
    """An arrow string column as Python strings; invalid UTF-8 (which pyarrow's json and parquet
    readers let through) is replaced with U+FFFD instead of raising; null -> ""."""
    import pyarrow as pa

    try:
        values = column.to_pylist()
    except UnicodeDecodeError:
        values = [None if b is None else b.decode("utf-8", "replace") for b in column.cast(pa.binary()).to_pylist()]
    return ["" if v is None else v for v in values]


def _is_json(arrow_type: Any) -> bool:
    """Whether ``datasets`` typed the column as JSON: its records hold values of several types."""
    return getattr(arrow_type, "extension_name", None) == "arrow.json"


def _mixed_message(field: str, description: str) -> str:
    # datasets then hands every text back JSON-quoted ('"Hello"'), which would be trained with its quotes.
    return (
        f"field {field!r} of {description} holds text in some records and other values (numbers, lists, objects) "
        "in others; every record's field must be a string"
    )


@register_record_kind("text")
class TextEncoder:
    """Text columns -> ``Document(ids, prompt_len, replaced_chars)``: a :class:`~kinds.RecordEncoder`.

    ``fields`` is ``[text_field]`` or ``[prompt_field, response_field]``.
    """

    whole_documents = False
    sample_prompt = "The"

    def __init__(
        self, tokenizer: Any, fields: list[str], *, parse_special_tokens: bool, mask_prompt: bool, eos_id: int
    ) -> None:
        self.tokenizer = tokenizer
        self.fields = fields
        self.parse_special_tokens = parse_special_tokens
        self.mask_prompt = mask_prompt
        self.eos_id = self.end_id = eos_id
        self.has_prompts = len(fields) == 2 and mask_prompt

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, *, description: str) -> TextEncoder:
        if cfg.messages_field is not None:
            raise ValueError(
                f"DataConfig.messages_field={cfg.messages_field!r} holds conversations, which kind 'text' does not "
                "read; set DataConfig.kind=chat (or leave kind unset)"
            )
        fields = [cfg.prompt_field, cfg.response_field] if cfg.prompt_field else [cfg.text_field]
        return cls(
            tokenizer,
            fields,
            parse_special_tokens=cfg.parse_special_tokens,
            mask_prompt=cfg.mask_prompt_labels,
            eos_id=resolve_eos_id(tokenizer, cfg.eos_id),
        )

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(
            texts,
            add_special_tokens=False,
            split_special_tokens=not self.parse_special_tokens,
            return_attention_mask=False,
            verbose=False,
        )["input_ids"]

    def encode_columns(self, columns: list[list[str]]) -> tuple[list[list[int]], list[int], list[int]]:
        """``(ids, prompt_len, replaced_chars)`` per document, from one list of texts per field."""
        replaced = [sum(text.count("\ufffd") for text in texts) for texts in zip(*columns, strict=True)]
        if len(columns) == 1:
            ids = self._encode(columns[0])
            return ids, [0] * len(ids), replaced
        prompts, responses = self._encode(columns[0]), self._encode(columns[1])
        ids = [p + r for p, r in zip(prompts, responses, strict=True)]
        prompt_lens = [len(p) if self.mask_prompt else 0 for p in prompts]
        return ids, prompt_lens, replaced

    # -- the RecordEncoder protocol -------------------------------------------------------------
    def check_columns(self, columns: Sequence[str], features: Any, description: str) -> None:
        for f in self.fields:
            if f not in columns:
                key = "text_field" if len(self.fields) == 1 else "prompt_field/response_field"
                raise ValueError(
                    f"field {f!r} is not in {description}; its fields are {list(columns)}. Set DataConfig.{key} to "
                    "the field that holds the text"
                )
            feature = features[f] if features is not None else None
            if _is_json(getattr(feature, "pa_type", None)):
                raise ValueError(_mixed_message(f, description))
            dtype = getattr(feature, "dtype", "string")
            if dtype not in ("string", "large_string"):
                raise ValueError(f"field {f!r} of {description} holds {feature}, not text")

    def columns(self, table: Any) -> list[list[str]]:
        for f in self.fields:
            if _is_json(table.column(f).type):  # a stream whose features were unknown to check_columns
                raise ValueError(_mixed_message(f, "the source"))
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

    def read(self, table: Any) -> list[Document]:
        ids = table.column("input_ids").to_pylist()
        prompt_lens = table.column("prompt_len").to_pylist()
        replaced = table.column("replaced_chars").to_pylist()
        return [Document(ids[k], prompt_lens[k], replaced[k]) for k in range(len(ids))]

    def cache_key(self) -> str:
        options = repr((self.parse_special_tokens, self.mask_prompt))
        return "\n".join([TEXT_TOKENIZED_VERSION, repr(self.fields), options])

    def report(self, tokenized: Any, description: str) -> None:
        import pyarrow.compute as pc

        replaced = pc.sum(tokenized.data.column("replaced_chars")).as_py() or 0
        if replaced:
            warnings.warn(
                f"{description}: {replaced} characters are U+FFFD (undecodable bytes replaced, or already in the text)",
                stacklevel=3,
            )

    def prompt_ids(self, text: str) -> list[int]:
        # An empty prompt starts from the EOS, as a document after another does.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.eos_id]
