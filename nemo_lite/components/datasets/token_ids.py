"""The ``token_ids`` record kind: pre-tokenized documents, one list of token ids per record.

A record is ``{"input_ids": [3, 17, 9, ...]}`` (the column Hugging Face tokenized datasets use);
the ids are the document as they are, and the packer appends the EOS. The tokenizer
(``DataConfig.tokenizer``) is still the one the ids came from: its vocabulary bounds them, its EOS
ends every document, and it encodes and decodes the trained model's samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.documents import Document
from nemo_lite.components.datasets.kinds import register_record_kind
from nemo_lite.components.datasets.tokenizer import resolve_eos_id

IDS_FIELD = "input_ids"
_VERSION = "nemo_lite-token-ids-v1"


@register_record_kind("token_ids")
class TokenIdsEncoder:
    """``{"input_ids": [...]}`` records -> ``Document(ids)``: a :class:`~kinds.RecordEncoder`."""

    has_prompts = whole_documents = False
    sample_prompt = "The"

    def __init__(self, tokenizer: Any, *, eos_id: int, description: str) -> None:
        self.tokenizer = tokenizer
        self.eos_id = self.end_id = eos_id
        self.vocab_size = len(tokenizer)
        self.description = description

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, *, description: str) -> TokenIdsEncoder:
        return cls(tokenizer, eos_id=resolve_eos_id(tokenizer, cfg.eos_id), description=description)

    def _checked(self, ids: Any, index: int) -> list[int]:
        if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise ValueError(
                f"record {index} of {self.description}: {IDS_FIELD!r} holds {str(ids)[:60]}, not a list of token ids "
                f"in [0, {self.vocab_size}) (the vocabulary of DataConfig.tokenizer)"
            )
        return ids

    def check_columns(self, columns: Sequence[str], features: Any, description: str) -> None:
        if IDS_FIELD not in columns:
            raise ValueError(
                f"field {IDS_FIELD!r} is not in {description}; its fields are {list(columns)}. Records of "
                f"DataConfig.kind=token_ids hold their token ids in {IDS_FIELD!r}"
            )
        feature = features[IDS_FIELD] if features is not None else None
        if feature is not None and not hasattr(feature, "feature"):
            raise ValueError(f"field {IDS_FIELD!r} of {description} holds {feature}, not lists of token ids")

    def columns(self, table: Any) -> list[list[Any]]:
        return [table.column(IDS_FIELD).to_pylist()]

    def documents(self, records: Sequence[tuple[Any, ...]], indices: Sequence[int]) -> list[Document]:
        return [Document(self._checked(ids, index)) for (ids,), index in zip(records, indices, strict=True)]

    def __call__(self, table: Any, indices: list[int]) -> dict[str, list[Any]]:
        ids = self.columns(table)[0]
        return {IDS_FIELD: [self._checked(d, index) for d, index in zip(ids, indices, strict=True)]}

    def features(self) -> Any:
        import datasets

        return datasets.Features({IDS_FIELD: datasets.List(datasets.Value("int32"))})

    def read(self, table: Any) -> list[Document]:
        return [Document(ids) for ids in table.column(IDS_FIELD).to_pylist()]

    def cache_key(self) -> str:
        return _VERSION

    def report(self, tokenized: Any, description: str) -> None:
        pass  # the ids are kept as they are: nothing to report

    def prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.eos_id]
