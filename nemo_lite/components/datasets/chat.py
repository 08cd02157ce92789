"""Conversations -> token ids and a trainable mask, through the tokenizer's own chat template.

A conversation is a list of messages in the Hugging Face chat format, ``[{"role": ..., "content":
...}, ...]``, held in one column (``DataConfig.messages_field``). It is rendered with the tokenizer's
chat template (``tokenizer.apply_chat_template``; ``DataConfig.chat_template`` replaces it) and
tokenized once. Which tokens the loss sees (docs/finetuning.md has a picture):

- The assistant's tokens of every assistant turn, and its end-of-turn token(s), are trained; all else
  (system prompt, user and tool messages, the role headers) gets label -100.
- A template with ``{% generation %}`` blocks marks the assistant tokens itself
  (``return_assistant_tokens_mask=True``); that mask is used as it is.
- Any other template: assistant turn ``i`` is the text that rendering ``messages[:i+1]`` adds to
  rendering ``messages[:i]`` with the generation prompt, i.e. what the model has to write after the
  assistant header. Whitespace the template writes after the turn's closing special token
  (ChatML's ``"\\n"`` after ``<|im_end|>``) is layout, not trained. A template whose prefix renderings
  are not prefixes of the whole conversation (one that rewrites earlier turns) is refused; where nemo_lite
  ships a generation-marked copy of that template (:data:`SHIPPED_TEMPLATES`: one that drops the thinking of
  earlier assistant turns, say), the refusal names the ``data.chat_template`` value that selects it.

Each conversation is one document of the packed rows. The rows delimit documents by one token id
(the masks' EOS); a chat template usually ends every turn with the tokenizer's EOS (``<|im_end|>``),
which would make every turn a document of its own. So the delimiter is a token the template never
writes, chosen by :func:`chat_delimiter_id`, and every conversation is checked not to contain it.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nemo_lite.components.datasets.config import DataConfig
from nemo_lite.components.datasets.documents import Document
from nemo_lite.components.datasets.kinds import register_record_kind

CHAT_TOKENIZED_VERSION = "nemo_lite-chat-v2"  # v2: JSON-typed columns parsed back
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "assets" / "chat_templates"


def _shipped_templates() -> dict[str, tuple[str, ...]]:
    """data.chat_template=<name> -> TEMPLATES_DIR/<name>.jinja, a stock template that rewrites earlier turns, the
    same text with {% generation %} blocks. Beside it <name>.json lists the sha256 of each stock template (stripped)
    it stands for ("stock_sha256", and "stock_of": whose they are), so that refusing one of those names the value
    that selects its copy. Shipping another is dropping in the two files."""
    out = {}
    for template in sorted(TEMPLATES_DIR.glob("*.jinja")):
        sidecar = template.with_suffix(".json")
        if not sidecar.is_file():
            raise FileNotFoundError(f"shipped chat template {template.name} has no {sidecar.name} beside it")
        out[template.stem] = tuple(json.loads(sidecar.read_text(encoding="utf-8"))["stock_sha256"])
    return out


SHIPPED_TEMPLATES: dict[str, tuple[str, ...]] = _shipped_templates()
ASSISTANT = "assistant"
_JSON_EXTENSION = "arrow.json"  # how datasets stores a column of mixed types (datasets.Json)
# How HF templates mark assistant tokens (transformers looks for the same tag).
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Tokens tried as the document delimiter after the tokenizer's eos/pad/unk/bos (chat_delimiter_id).
_DELIMITER_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>", "<pad>", "<unk>", "<s>")
# A conversation the delimiter is chosen against: every role a template commonly knows.
_PROBE = (
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "4 plus 4 is 8."},
)


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def shipped_template(name: str) -> str:
    """The text of the template :data:`SHIPPED_TEMPLATES` names ``name``."""
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def shipped_variant_of(template: str) -> str | None:
    """The name of the shipped generation-marked copy of ``template`` (None: nemo_lite ships none)."""
    digest = hashlib.sha256(template.strip().encode()).hexdigest()
    return next((name for name, stock in SHIPPED_TEMPLATES.items() if digest in stock), None)


def chat_template_of(tokenizer: Any, chat_template: str | None = None) -> str:
    """The Jinja template conversations are rendered with: ``chat_template`` when given (the name of a shipped
    template, :data:`SHIPPED_TEMPLATES`, or a file), else the tokenizer's own. ValueError (one line) when there
    is none."""
    if chat_template is not None:
        path = Path(chat_template).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        if chat_template in SHIPPED_TEMPLATES:
            return shipped_template(chat_template)
        raise FileNotFoundError(
            f"DataConfig.chat_template={chat_template!r} is not a file (a Jinja chat template) nor a template "
            f"nemo_lite ships ({', '.join(SHIPPED_TEMPLATES)})"
        )
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise ValueError(
            f"tokenizer {_name(tokenizer)!r} has no chat template, so conversations (DataConfig.messages_field) "
            "cannot be rendered; use a chat model's tokenizer or set DataConfig.chat_template to a Jinja file"
        )
    return template


def uses_generation_blocks(template: str) -> bool:
    """Whether the template marks the assistant's tokens itself (``{% generation %}``)."""
    return bool(_GENERATION_TAG.search(template))


def _render(tokenizer: Any, template: str, messages: Sequence[dict], *, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        list(messages), chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _ids(tokenizer: Any, text: str) -> list[int]:
    # The rendered text's special tokens are the template's: parse them (as apply_chat_template does).
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_delimiter_id(tokenizer: Any, template: str, eos_id: int | None = None) -> int:
    """The token that ends each conversation in the packed rows (the loader's ``eos_id``).

    ``eos_id`` when given; else the first of the tokenizer's eos, pad, unk and bos tokens, then
    ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``, ``<eos>``, ``<|end|>``, ``<pad>``, ``<unk>``,
    ``<s>``, that the template does not write when it renders a probe conversation (system, user,
    assistant, user, assistant, and the generation prompt). Each conversation is checked again when
    it is tokenized. ValueError (one line) when no candidate is usable or ``eos_id`` is one the
    template writes.
    """
    try:
        text = _render(tokenizer, template, _PROBE, generation_prompt=True)
    except Exception:  # a template without a system role: probe without it
        try:
            text = _render(tokenizer, template, _PROBE[1:], generation_prompt=True)
        except Exception as err:
            raise ValueError(
                f"the chat template of {_name(tokenizer)!r} cannot render a plain user/assistant conversation: "
                f"{type(err).__name__}: {err}"
            ) from None
    written = set(_ids(tokenizer, text))
    vocab_size = len(tokenizer)
    if eos_id is not None:
        if not 0 <= eos_id < vocab_size:
            raise ValueError(
                f"DataConfig.eos_id={eos_id} is outside the vocabulary of {_name(tokenizer)!r} ({vocab_size})"
            )
        if eos_id in written:
            raise ValueError(
                f"DataConfig.eos_id={eos_id} ({tokenizer.convert_ids_to_tokens(eos_id)!r}) is written by the chat "
                "template inside conversations, so it cannot delimit them; choose a token the template never writes "
                "or leave eos_id unset"
            )
        return eos_id
    vocab = tokenizer.get_vocab()
    candidates: list[int] = []
    for attr in ("eos_token_id", "pad_token_id", "unk_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            candidates.append(value)
    candidates += [vocab[name] for name in _DELIMITER_NAMES if name in vocab]
    for candidate in candidates:
        if candidate not in written:
            return candidate
    tried = sorted({tokenizer.convert_ids_to_tokens(c) for c in candidates})
    raise ValueError(
        f"tokenizer {_name(tokenizer)!r}: every candidate document delimiter {tried} is written by its chat template; "
        "set DataConfig.eos_id to the id of a token that never occurs in a rendered conversation"
    )


def _has_json(arrow_type: Any) -> bool:
    """Whether ``arrow_type`` holds a ``datasets`` JSON column anywhere (see :func:`read_column`)."""
    if getattr(arrow_type, "extension_name", None) == _JSON_EXTENSION:
        return True
    if getattr(arrow_type, "num_fields", 0):
        return any(_has_json(arrow_type.field(i).type) for i in range(arrow_type.num_fields))
    return False


def _decode_json(value: Any, arrow_type: Any) -> Any:
    """``value`` (Python, as ``to_pylist`` gives it) with every JSON-typed part parsed back."""
    if value is None:
        return None
    if getattr(arrow_type, "extension_name", None) == _JSON_EXTENSION:
        return json.loads(value)
    if hasattr(arrow_type, "value_type") and isinstance(value, list):  # list, large_list, fixed_size_list
        return [_decode_json(v, arrow_type.value_type) for v in value]
    if getattr(arrow_type, "num_fields", 0) and isinstance(value, dict):  # struct
        types = {arrow_type.field(i).name: arrow_type.field(i).type for i in range(arrow_type.num_fields)}
        return {k: _decode_json(v, types[k]) if k in types else v for k, v in value.items()}
    return value


def read_column(table: Any, field: str) -> list[Any]:
    """The values of column ``field`` of a ``pyarrow.Table``, as the records hold them.

    When one record's value has another type than the rest (a number or a list of parts where the others hold
    a string, or a message with an extra key), ``datasets`` types the column, or the part of it that differs, as
    JSON and hands every value of it as JSON text (``"Hi"`` with its quotes); those parts are parsed back here,
    so each record keeps its own value and is checked on its own.
    """
    column = table.column(field)
    values = column.to_pylist()
    if not _has_json(column.type):
        return values
    return [_decode_json(v, column.type) for v in values]


def _is_json_feature(feature: Any) -> bool:
    """Whether ``feature`` is the ``datasets.Json`` type a column of mixed types gets."""
    import datasets

    json_type = getattr(datasets, "Json", None)  # an older datasets refuses such files instead
    return json_type is not None and isinstance(feature, json_type)


def _content_text(content: Any, where: str, i: int) -> str:
    """A message's content as text: a string, or the concatenated ``{"type": "text", "text": ...}`` parts (as
    templates that take part lists render them); anything else is refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(
            f"{where}: message {i}, field 'content' holds {type(content).__name__} ({_short(content)}); content must "
            "be a string or a list of {'type': 'text', 'text': ...} parts"
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(text, str):
            shown = f"type {kind!r}" if isinstance(kind, str) and kind != "text" else _short(part)
            raise ValueError(
                f"{where}: message {i}, field 'content', part {j} is {shown}; only text parts "
                "({'type': 'text', 'text': '...'}) can be trained on as text"
            )
        texts.append(text)
    return "".join(texts)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_messages(value: Any, where: str) -> list[dict]:
    """The conversation as a list of message dicts (keys holding None dropped, content parts joined into one
    string), or ValueError naming the message and the field."""
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: the messages field holds {type(value).__name__}, not a list of {{'role', 'content'}} messages"
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {i} is {type(message).__name__}, not a {{'role', 'content'}} dict")
        message = {k: v for k, v in message.items() if v is not None}  # arrow gives absent struct keys as None
        if "role" not in message or ("content" not in message and "tool_calls" not in message):
            raise ValueError(
                f"{where}: message {i} has keys {sorted(message)}; each message needs a string 'role' and a string "
                "'content' (the Hugging Face chat format)"
            )
        if not isinstance(message["role"], str):
            raise ValueError(
                f"{where}: message {i}, field 'role' holds {type(message['role']).__name__} "
                f"({_short(message['role'])}); the role must be a string such as 'user' or 'assistant'"
            )
        if "content" in message:
            message["content"] = _content_text(message["content"], where, i)
        messages.append(message)
    return messages


@register_record_kind("chat")
class ChatEncoder:
    """Conversations (one column of message lists) -> ``Document`` (ids, trainable mask): a
    :class:`~kinds.RecordEncoder`.

    Picklable, for ``datasets.map``. ``max_tokens`` cuts longer conversations (the packer needs the
    conversation and its delimiter in one row). Documents end with ``delimiter_id`` in the rows;
    generation stops at the tokenizer's EOS, the end of a turn.
    """

    has_prompts = whole_documents = True
    # The user turn of the end-of-run sample: a question the default conversation set teaches to answer.
    sample_prompt = "What is 12 times 3?"

    def __init__(
        self, tokenizer: Any, field: str, *, template: str, delimiter_id: int, max_tokens: int, description: str
    ) -> None:
        self.tokenizer = tokenizer
        self.fields = [field]
        self.template = template
        self.delimiter_id = self.eos_id = delimiter_id
        end = getattr(tokenizer, "eos_token_id", None)
        self.end_id = delimiter_id if end is None else end
        self.max_tokens = max_tokens
        self.description = description
        self.generation_blocks = uses_generation_blocks(template)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self._special = tuple(sorted({str(t) for t in added.values()} | set(tokenizer.all_special_tokens), key=len))
        self._warned_truncation = False

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, *, description: str) -> ChatEncoder:
        if cfg.messages_field is None:
            raise ValueError(
                "DataConfig.kind=chat reads conversations from DataConfig.messages_field; set it to the field that "
                "holds each conversation's messages"
            )
        template = chat_template_of(tokenizer, cfg.chat_template)
        tokenizer.chat_template = template  # the one the exported tokenizer carries
        return cls(
            tokenizer,
            cfg.messages_field,
            template=template,
            delimiter_id=chat_delimiter_id(tokenizer, template, cfg.eos_id),
            max_tokens=cfg.seq_len - 1,
            description=description,
        )

    # -- one conversation -----------------------------------------------------------------------
    def _where(self, index: int) -> str:
        return f"conversation {index} of {self.description}"

    def _render_checked(self, messages: list[dict], index: int, **kwargs: Any) -> str:
        from jinja2 import TemplateError

        try:
            return _render(self.tokenizer, self.template, messages, **kwargs)
        except TemplateError as err:
            culprit = self._rejected_message(messages)
            raise ValueError(
                f"{self._where(index)}: the chat template of {_name(self.tokenizer)!r} rejects {culprit}: {err}"
            ) from None

    def _rejected_message(self, messages: list[dict]) -> str:
        """The first message whose addition makes the template raise (for the error message)."""
        from jinja2 import TemplateError

        for k in range(1, len(messages) + 1):
            try:
                _render(self.tokenizer, self.template, messages[:k])
            except TemplateError:
                return f"message {k - 1} (role {messages[k - 1]['role']!r})"
            except Exception:
                break
        return f"the conversation (roles {[m['role'] for m in messages]})"

    def _generation_advice(self) -> str:
        """What to do about a template whose prefixes cannot be rendered: the shipped copy that marks the assistant's
        tokens, where there is one."""
        name = shipped_variant_of(self.template)
        if name is not None:
            return (
                f"pass data.chat_template={name} (the same template with {{% generation %}} blocks, shipped with "
                "nemo_lite)"
            )
        return (
            "wrap what each assistant turn writes in {% generation %} ... {% endgeneration %} in a copy of the "
            "template and pass it as data.chat_template=FILE (docs/finetuning.md)"
        )

    def _assistant_spans(self, messages: list[dict], full: str, index: int) -> list[tuple[int, int]]:
        """Character spans of ``full`` that are trained, by rendering prefixes."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            before = self._render_checked(messages[:i], index, generation_prompt=True) if i else ""
            through = self._render_checked(messages[: i + 1], index)
            if not (full.startswith(through) and through.startswith(before)):
                raise ValueError(
                    f"{self._where(index)}: the chat template of {_name(self.tokenizer)!r} renders the first {i + 1} "
                    "messages as text that is not a prefix of the whole conversation (it rewrites earlier turns), so "
                    f"the assistant's tokens cannot be found by rendering prefixes; {self._generation_advice()}"
                )
            if i and before == self._render_checked(messages[:i], index):
                raise ValueError(
                    f"{self._where(index)}: the chat template of {_name(self.tokenizer)!r} writes no generation "
                    "prompt (add_generation_prompt changes nothing), so the assistant header cannot be told from its "
                    "content; use a template with a generation prompt or {% generation %} blocks"
                )
            turn = through[len(before) :]
            kept = turn.rstrip()
            if kept != turn and not kept.endswith(self._special):
                kept = turn  # trailing whitespace that is the assistant's own (no end-of-turn token before it)
            spans.append((len(before), len(before) + len(kept)))
        return spans

    def encode(self, value: Any, index: int) -> tuple[list[int], list[int], bool]:
        """``(ids, trainable, truncated)`` of one conversation; ``([], [], ...)`` when nothing is trained."""
        messages = _check_messages(value, self._where(index))
        if not messages or not any(m["role"] == ASSISTANT for m in messages):
            return [], [], False
        if self.generation_blocks:
            try:
                out = self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=self.template,
                    tokenize=True,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                )
            except Exception as err:
                if type(err).__module__.startswith("jinja2"):
                    self._render_checked(messages, index)  # raises the one-line error
                raise
            ids, trainable = list(out["input_ids"]), list(out["assistant_masks"])
        else:
            full = self._render_checked(messages, index)
            spans = self._assistant_spans(messages, full, index)
            encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = encoded["input_ids"]
            trainable = [0] * len(ids)
            k = 0
            for t, (start, end) in enumerate(encoded["offset_mapping"]):
                while k < len(spans) and start >= spans[k][1]:
                    k += 1
                if k == len(spans):
                    break
                if end > spans[k][0]:  # the token overlaps the span: it carries assistant text
                    trainable[t] = 1
        if self.delimiter_id in ids:
            token = self.tokenizer.convert_ids_to_tokens(self.delimiter_id)
            raise ValueError(
                f"{self._where(index)} contains the document delimiter {token!r} (id {self.delimiter_id}); remove it "
                "from the text or set DataConfig.eos_id to a token that never occurs in a conversation"
            )
        truncated = len(ids) > self.max_tokens
        ids, trainable = ids[: self.max_tokens], trainable[: self.max_tokens]
        if not any(trainable):
            return [], [], truncated
        return ids, trainable, truncated

    # -- the RecordEncoder protocol -------------------------------------------------------------
    def check_columns(self, columns: Sequence[str], features: Any, description: str) -> None:
        """The messages column exists and holds lists (each conversation is checked when encoded)."""
        field = self.fields[0]
        if field not in columns:
            raise ValueError(
                f"field {field!r} is not in {description}; its fields are {list(columns)}. Set "
                "DataConfig.messages_field to the field that holds each conversation's messages"
            )
        feature = features[field] if features is not None else None
        if _is_json_feature(feature):
            return  # values of several types: each conversation is checked on its own (read_column)
        if feature is not None and not isinstance(feature, list) and not hasattr(feature, "feature"):
            raise ValueError(
                f"field {field!r} of {description} holds {feature}, not lists of {{'role', 'content'}} messages"
            )

    def columns(self, table: Any) -> list[list]:
        return [read_column(table, self.fields[0])]

    def documents(self, records: Sequence[tuple], indices: Sequence[int]) -> list[Document]:
        docs = []
        for (value,), index in zip(records, indices, strict=True):
            ids, trainable, truncated = self.encode(value, index)
            if truncated and not self._warned_truncation:
                self._warned_truncation = True
                warnings.warn(_truncation_message(self.description, None, self.max_tokens), stacklevel=2)
            docs.append(Document(ids, 0, 0, trainable))
        return docs

    def __call__(self, table: Any, indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "trainable": [], "truncated": []}
        for value, index in zip(self.columns(table)[0], indices, strict=True):
            ids, trainable, truncated = self.encode(value, index)
            out["input_ids"].append(ids)
            out["trainable"].append(trainable)
            out["truncated"].append(truncated)
        return out

    def features(self) -> Any:
        import datasets

        return datasets.Features(
            {
                "input_ids": datasets.List(datasets.Value("int32")),
                "trainable": datasets.List(datasets.Value("uint8")),
                "truncated": datasets.Value("bool"),
            }
        )

    def read(self, table: Any) -> list[Document]:
        ids, trainable = table.column("input_ids").to_pylist(), table.column("trainable").to_pylist()
        return [Document(d, 0, 0, t) for d, t in zip(ids, trainable, strict=True)]

    def cache_key(self) -> str:
        template = hashlib.sha256(self.template.encode()).hexdigest()
        return repr((CHAT_TOKENIZED_VERSION, self.fields, template, self.delimiter_id, self.max_tokens))

    def report(self, tokenized: Any, description: str) -> None:
        """Warn about conversations cut at ``max_tokens`` and ones with nothing to train."""
        import pyarrow.compute as pc

        truncated = pc.sum(tokenized.data.column("truncated")).as_py() or 0
        if truncated:
            warnings.warn(_truncation_message(description, truncated, self.max_tokens), stacklevel=3)
        empty = pc.sum(pc.equal(pc.list_value_length(tokenized.data.column("input_ids")), 0)).as_py() or 0
        if empty:
            warnings.warn(
                f"{description}: {empty} of {len(tokenized)} conversations have no assistant token to train on (no "
                "assistant turn, or cut before it); they are skipped",
                stacklevel=3,
            )

    def prompt_ids(self, text: str) -> list[int]:
        """``text`` as one user turn, rendered with the chat template and its generation prompt."""
        messages = [{"role": "user", "content": text}]
        return _ids(self.tokenizer, _render(self.tokenizer, self.template, messages, generation_prompt=True))


def _truncation_message(description: str, count: int | None, max_tokens: int) -> str:
    what = f"{count} conversations are" if count is not None else "conversations are"
    return (
        f"{description}: {what} longer than seq_len - 1 = {max_tokens} tokens and cut there (a conversation and its "
        "delimiter must fit in one row); raise DataConfig.seq_len to keep them whole"
    )
