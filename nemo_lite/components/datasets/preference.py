"""The ``preference`` record kind: a prompt, a chosen and a rejected answer -> one packed pair.

The records are TRL's preference formats with an explicit prompt: three columns (``DataConfig.prompt_field``,
default ``"prompt"``, ``chosen_field``, ``rejected_field``), each plain text, or each a conversation in the
Hugging Face chat format (the prompt's messages, and the answers' assistant messages). Without a prompt column
(and ``prompt_field`` unset), TRL's implicit-prompt format: the prompt is the answers' longest common start
(messages, or characters less a space just before where they part). They are tokenized as
TRL's ``DPOTrainer`` does, so both train on the same tokens:

- plain text: the tokenizer's EOS is appended to an answer that does not end with it; the prompt, prompt +
  chosen and prompt + rejected are tokenized (with the tokenizer's own special tokens);
- conversations: the prompt is rendered with the chat template and its generation prompt, prompt + chosen
  and prompt + rejected without it (``DataConfig.chat_template`` replaces the tokenizer's template);
- the prompt is the longest start the three token lists share; each answer is the rest of its list.

A pair is one document of the packed rows, kept whole in one row (``whole_documents``), with loss targets on
the answers only: the chosen answer's tokens are marked 1 and the rejected answer's 2 in ``trainable``, so the
loader's ``answer_ids`` tell the objective which answer of which pair a label belongs to. Two layouts:

- separate (default): ``prompt chosen D prompt rejected`` (``D`` the delimiter): two documents, positions
  restarting after ``D``, as two sequences would be;
- ``shared_prompt``: ``prompt chosen p rejected`` where ``p`` is a copy of the prompt's last token, the
  positions of ``p rejected`` restart at that token's position. The mask rule ``shared_prompt``
  (``components/attention/masks.py``) lets ``p rejected`` see the prompt but not the chosen answer, so each
  answer's log-probabilities are those of its own sequence while the prompt is computed once.

The document delimiter is a token neither the template nor the records write: the first of the tokenizer's
pad, unk and bos tokens, then ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ... (as the chat kind), that is
not the EOS (plain-text answers end with it) and that the chat template does not write; ``DataConfig.eos_id``
chooses it. A pair longer than ``seq_len - 1`` tokens is skipped with a warning (a cut answer would change
what is preferred). Bad records are refused in one line that names the record and the field.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from typing import Any

from nemo_lite.components.datasets.chat import (
    _DELIMITER_NAMES,
    _PROBE,
    _check_messages,
    _ids,
    _name,
    _render,
    chat_template_of,
    read_column,
)
from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.documents import Document
from nemo_lite.components.datasets.kinds import register_record_kind

PREFERENCE_TOKENIZED_VERSION = "nemo_lite-preference-v2"  # v2: JSON-typed columns parsed back
CHOSEN, REJECTED = 1, 2  # the trainable marks of the two answers


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def preference_delimiter_id(tokenizer: Any, template: str | None, eos_id: int | None = None) -> int:
    """The token that ends each pair (and, in the separate layout, its chosen sequence) in the packed rows."""
    written: set[int] = set()
    if template is not None:
        try:
            written = set(_ids(tokenizer, _render(tokenizer, template, _PROBE, generation_prompt=True)))
        except Exception:  # a template without a system role
            written = set(_ids(tokenizer, _render(tokenizer, template, _PROBE[1:], generation_prompt=True)))
    if eos_id is not None:
        if not 0 <= eos_id < len(tokenizer):
            raise ValueError(f"DataConfig.eos_id={eos_id} is outside the vocabulary of {_name(tokenizer)!r}")
        if eos_id in written:
            raise ValueError(
                f"DataConfig.eos_id={eos_id} is written by the chat template of {_name(tokenizer)!r}, so it cannot "
                "delimit preference pairs; choose a token the template never writes or leave eos_id unset"
            )
        return eos_id
    eos = getattr(tokenizer, "eos_token_id", None)
    vocab = tokenizer.get_vocab()
    candidates = [getattr(tokenizer, a, None) for a in ("pad_token_id", "unk_token_id", "bos_token_id")]
    candidates += [vocab[name] for name in _DELIMITER_NAMES if name in vocab]
    for candidate in candidates:
        if isinstance(candidate, int) and candidate != eos and candidate not in written:
            return candidate
    raise ValueError(
        f"tokenizer {_name(tokenizer)!r} has no token to delimit preference pairs (one that is not its EOS and that "
        "its chat template never writes); set DataConfig.eos_id to such a token's id"
    )


def implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """TRL's implicit-prompt format: the prompt is the longest common start of the two answers (messages of
    two conversations, or characters of two texts, less a space just before where they part)."""
    if not isinstance(chosen, type(rejected)) or not isinstance(chosen, list | str):
        return None, chosen, rejected  # refused with the record's index by pair_ids
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def pair_document(
    prompt: list[int], chosen: list[int], rejected: list[int], *, delimiter_id: int, shared_prompt: bool
) -> tuple[list[int], list[int], list[int]]:
    """One pair as a packed document: ``(ids, trainable, positions)`` (positions empty in the separate layout,
    where the packer counts them from the delimiter). ``prompt`` must not be empty."""
    p, c, r = len(prompt), len(chosen), len(rejected)
    if shared_prompt:
        ids = prompt + chosen + prompt[-1:] + rejected
        trainable = [0] * p + [CHOSEN] * c + [0] + [REJECTED] * r
        return ids, trainable, [*range(p + c), *range(p - 1, p + r)]
    ids = prompt + chosen + [delimiter_id] + prompt + rejected
    return ids, [0] * p + [CHOSEN] * c + [0] * (1 + p) + [REJECTED] * r, []


@register_record_kind("preference")
class PreferenceEncoder:
    """Prompt/chosen/rejected records -> one ``Document`` per pair: a :class:`~kinds.RecordEncoder`."""

    whole_documents = True
    has_prompts = True
    pairs = True  # the loader adds "answer_ids" to every batch

    def __init__(
        self,
        tokenizer: Any,
        fields: list[str],
        *,
        template: str | None,
        delimiter_id: int,
        max_tokens: int,
        shared_prompt: bool,
        description: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.fields = fields
        self.template = template
        self.delimiter_id = self.eos_id = delimiter_id
        end = getattr(tokenizer, "eos_token_id", None)
        self.end_id = delimiter_id if end is None else end
        self.max_tokens = max_tokens
        self.shared_prompt = shared_prompt
        self.description = description
        self.prompt_field_set = False  # DataConfig.prompt_field named explicitly (no implicit prompt then)
        self.implicit_prompt = False  # no prompt column: the prompt is the answers' common start (check_columns)
        self._warned = False

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, *, description: str) -> PreferenceEncoder:
        if cfg.messages_field is not None or cfg.response_field is not None:
            raise ValueError(
                "DataConfig.kind=preference reads prompt_field, chosen_field and rejected_field; unset messages_field "
                "and response_field"
            )
        if cfg.shared_prompt and not cfg.position_ids:
            raise ValueError(
                "DataConfig.shared_prompt=true restarts the positions after the prompt for each answer, which "
                "position_ids=false would drop; set position_ids=true"
            )
        template = None
        if cfg.chat_template is not None or getattr(tokenizer, "chat_template", None):
            template = chat_template_of(tokenizer, cfg.chat_template)
            tokenizer.chat_template = template  # the one the exported tokenizer carries
        encoder = cls(
            tokenizer,
            [cfg.prompt_field or "prompt", cfg.chosen_field, cfg.rejected_field],
            template=template,
            delimiter_id=preference_delimiter_id(tokenizer, template, cfg.eos_id),
            max_tokens=cfg.seq_len - 1,
            shared_prompt=cfg.shared_prompt,
            description=description,
        )
        encoder.prompt_field_set = cfg.prompt_field is not None
        return encoder

    # -- one pair -------------------------------------------------------------------------------
    def _where(self, index: int, field: str) -> str:
        return f"record {index} of {self.description}, field {field!r}"

    def _tokenize(self, value: Any, *, conversation: bool, generation_prompt: bool = False) -> list[int]:
        if not conversation:
            return list(self.tokenizer(value)["input_ids"])
        return list(
            self.tokenizer.apply_chat_template(
                value,
                chat_template=self.template,
                tokenize=True,
                return_dict=True,
                add_generation_prompt=generation_prompt,
            )["input_ids"]
        )

    def pair_ids(self, values: Sequence[Any], index: int) -> tuple[list[int], list[int], list[int]]:
        """``(prompt, chosen, rejected)`` token ids of one record, as TRL's ``DPOTrainer`` tokenizes it."""
        prompt_field, chosen_field, rejected_field = self.fields
        if self.implicit_prompt:
            values = implicit_prompt(values[1], values[2])
        prompt, chosen, rejected = values
        conversation = isinstance(prompt, list)
        for field, value in zip(self.fields, values, strict=True):
            if conversation and not isinstance(value, list):
                raise ValueError(
                    f"{self._where(index, field)} holds {type(value).__name__} but {prompt_field!r} holds a "
                    "conversation; the prompt and both answers must all be text or all be conversations"
                )
            if not conversation and not isinstance(value, str):
                raise ValueError(
                    f"{self._where(index, field)} holds {type(value).__name__}; a preference record's fields hold "
                    "text, or lists of {'role', 'content'} messages"
                )
        if conversation:
            if self.template is None:
                raise ValueError(
                    f"{self._where(index, prompt_field)} is a conversation but tokenizer "
                    f"{_name(self.tokenizer)!r} has no chat template; set DataConfig.chat_template to a Jinja file"
                )
            prompt, chosen, rejected = (
                _check_messages(v, self._where(index, f)) for f, v in zip(self.fields, values, strict=True)
            )
            for field, answer in ((chosen_field, chosen), (rejected_field, rejected)):
                if not answer:
                    raise ValueError(f"{self._where(index, field)} is an empty conversation; it needs the answer")
            prompt_ids = self._tokenize(prompt, conversation=True, generation_prompt=True)
            full_chosen = self._tokenize(prompt + chosen, conversation=True)
            full_rejected = self._tokenize(prompt + rejected, conversation=True)
        else:
            eos = self.tokenizer.eos_token or ""
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
            prompt_ids = self._tokenize(prompt, conversation=False)
            full_chosen = self._tokenize(prompt + chosen, conversation=False)
            full_rejected = self._tokenize(prompt + rejected, conversation=False)
        n = min(common_prefix_length(prompt_ids, full_chosen), common_prefix_length(prompt_ids, full_rejected))
        if n == 0:
            raise ValueError(
                f"{self._where(index, prompt_field)} gives no prompt token before the answers; a pair needs a "
                "non-empty prompt (the first answer token is predicted from its last token)"
            )
        out = prompt_ids[:n], full_chosen[n:], full_rejected[n:]
        for field, ids in zip(self.fields, out, strict=True):
            if field != prompt_field and not ids:
                raise ValueError(f"{self._where(index, field)} gives no token after the prompt; the answer is empty")
            if self.delimiter_id in ids:
                token = self.tokenizer.convert_ids_to_tokens(self.delimiter_id)
                raise ValueError(
                    f"{self._where(index, field)} contains the pair delimiter {token!r} (id {self.delimiter_id}); "
                    "remove it or set DataConfig.eos_id to a token that never occurs in the records"
                )
        return out

    def encode(self, values: Sequence[Any], index: int) -> tuple[list[int], list[int], list[int], bool]:
        """``(ids, trainable, positions, too_long)``; positions are empty in the separate layout."""
        prompt, chosen, rejected = self.pair_ids(values, index)
        ids, trainable, positions = pair_document(
            prompt, chosen, rejected, delimiter_id=self.delimiter_id, shared_prompt=self.shared_prompt
        )
        if len(ids) > self.max_tokens:
            return [], [], [], True
        return ids, trainable, positions, False

    # -- the RecordEncoder protocol -------------------------------------------------------------
    def check_columns(self, columns: Sequence[str], features: Any, description: str) -> None:
        keys = ("prompt_field", "chosen_field", "rejected_field")
        self.implicit_prompt = self.fields[0] not in columns and not self.prompt_field_set
        for field, key in zip(self.fields, keys, strict=True):
            if field == self.fields[0] and self.implicit_prompt:
                continue
            if field not in columns:
                raise ValueError(
                    f"field {field!r} is not in {description}; its fields are {list(columns)}. Set DataConfig.{key} "
                    "to the field that holds it (preference records need a prompt, a chosen and a rejected answer)"
                )

    def columns(self, table: Any) -> list[list[Any]]:
        if self.implicit_prompt:
            return [[None] * table.num_rows, *(read_column(table, f) for f in self.fields[1:])]
        return [read_column(table, f) for f in self.fields]

    def _document(self, ids, trainable, positions) -> Document:
        return Document(ids, 0, 0, trainable, positions or None)

    def documents(self, records: Sequence[tuple[Any, ...]], indices: Sequence[int]) -> list[Document]:
        docs = []
        for values, index in zip(records, indices, strict=True):
            ids, trainable, positions, too_long = self.encode(values, index)
            if too_long and not self._warned:
                self._warned = True
                warnings.warn(_too_long_message(self.description, None, self.max_tokens), stacklevel=2)
            docs.append(self._document(ids, trainable, positions))
        return docs

    def __call__(self, table: Any, indices: list[int]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"input_ids": [], "trainable": [], "positions": [], "too_long": []}
        for values, index in zip(zip(*self.columns(table), strict=True), indices, strict=True):
            for key, value in zip(out, self.encode(values, index), strict=True):
                out[key].append(value)
        return out

    def features(self) -> Any:
        import datasets

        return datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "trainable": datasets.List(datasets.Value("uint8")),
                "positions": datasets.List(datasets.Value("int32")),
                "too_long": datasets.Value("bool"),
            }
        )

    def read(self, table: Any) -> list[Document]:
        columns = [table.column(k).to_pylist() for k in ("input_ids", "trainable", "positions")]
        return [self._document(*row) for row in zip(*columns, strict=True)]

    def cache_key(self) -> str:
        template = hashlib.sha256((self.template or "").encode()).hexdigest()
        options = (self.fields, self.implicit_prompt, template, self.delimiter_id, self.max_tokens, self.shared_prompt)
        return repr((PREFERENCE_TOKENIZED_VERSION, *options))

    def report(self, tokenized: Any, description: str) -> None:
        import pyarrow.compute as pc

        too_long = pc.sum(tokenized.data.column("too_long")).as_py() or 0
        if too_long:
            warnings.warn(_too_long_message(description, too_long, self.max_tokens), stacklevel=3)

    def prompt_ids(self, text: str) -> list[int]:
        """``text`` as one user turn with the generation prompt (with a chat template), else its tokens."""
        if self.template is not None:
            messages = [{"role": "user", "content": text}]
            return _ids(self.tokenizer, _render(self.tokenizer, self.template, messages, generation_prompt=True))
        return self.tokenizer(text)["input_ids"] or [self.eos_id]


def _too_long_message(description: str, count: int | None, max_tokens: int) -> str:
    what = f"{count} preference pairs are" if count is not None else "preference pairs are"
    return (
        f"{description}: {what} longer than seq_len - 1 = {max_tokens} tokens (a pair and its delimiter must fit in "
        "one row) and skipped; raise DataConfig.seq_len to keep them"
    )
