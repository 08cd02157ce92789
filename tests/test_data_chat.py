"""Conversations through the tokenizer's own chat template: which tokens are trained (hand-computed for
SmolLM2-Instruct's ChatML template and a Llama-3-style template), how conversations are packed (one
document each, whole in a row, delimited by a token the template never writes), and the one-line
errors for bad conversations and templates."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import pytest
import torch

from nemo_lite.components.attention.masks import document_ids
from nemo_lite.components.datasets import IGNORE_INDEX, DataConfig, build_dataloader, build_tokenizer
from nemo_lite.components.datasets.chat import ChatEncoder, chat_delimiter_id, chat_template_of
from nemo_lite.components.datasets.default_chat import generate_conversations

# A Llama-3-style template (written for this test): header tokens, <|eot_id|> ends every turn, no
# whitespace after it, and roles other than system/user/assistant/tool are refused.
LLAMA_STYLE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA_PLAIN = LLAMA_STYLE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "2 plus 3 is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "4 plus 4 is 8."},
]


def expected(tokenizer, pieces: list[tuple[str, int]]) -> tuple[list[int], list[tuple[str, int]]]:
    """Hand-split text, (text, 1 = trained) pieces -> the ids of the whole text and its runs of equal flags."""
    ids = tokenizer("".join(text for text, _ in pieces), add_special_tokens=False)["input_ids"]
    merged: list[tuple[str, int]] = []
    for text, flag in pieces:
        merged = (
            [*merged[:-1], (merged[-1][0] + text, flag)]
            if merged and merged[-1][1] == flag
            else [*merged, (text, flag)]
        )
    return ids, merged


def runs(tokenizer, ids: list[int], trainable: list[int]) -> tuple[list[int], list[tuple[str, int]]]:
    """``ids`` and the text of each run of equally flagged tokens."""
    out: list[tuple[list[int], int]] = []
    for t, flag in zip(ids, trainable, strict=True):
        if out and out[-1][1] == flag:
            out[-1][0].append(t)
        else:
            out.append(([t], flag))
    return ids, [(tokenizer.decode(run), flag) for run, flag in out]


def encoder(tokenizer, template: str | None = None, *, max_tokens: int = 10_000) -> ChatEncoder:
    template = template or chat_template_of(tokenizer)
    return ChatEncoder(
        tokenizer,
        "messages",
        template=template,
        delimiter_id=chat_delimiter_id(tokenizer, template),
        max_tokens=max_tokens,
        description="the test conversations",
    )


def write_jsonl(path, conversations, field="messages"):
    path.write_text("".join(json.dumps({field: c}) + "\n" for c in conversations))
    return str(path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    return build_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="module")
def llama_style_dir(tmp_path_factory):
    """The default tokenizer with Llama-3's special tokens added and the Llama-style template, saved."""
    tokenizer = build_tokenizer("default")
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA_PLAIN
    path = tmp_path_factory.mktemp("llama_style_tokenizer")
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def llama_tokenizer(llama_style_dir):
    return build_tokenizer(str(llama_style_dir))


# -- which tokens are trained -----------------------------------------------------------------
def test_chatml_masks_every_assistant_turn_and_its_end_of_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids, trainable, truncated = encoder(tok).encode(CONVERSATION, 0)
    assert not truncated
    want = expected(
        tok,
        [
            ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n", 0),
            ("<|im_start|>assistant\n", 0),
            ("2 plus 3 is 5.<|im_end|>", 1),
            ("\n<|im_start|>user\nAnd 4 plus 4?<|im_end|>\n<|im_start|>assistant\n", 0),
            ("4 plus 4 is 8.<|im_end|>", 1),
            ("\n", 0),  # the template's layout after <|im_end|>: never generated, not trained
        ],
    )
    assert runs(tok, ids, trainable) == want


def test_chatml_default_system_prompt_and_tool_messages_are_context(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conversation = [
        {"role": "user", "content": "Multiply 12 by 13."},
        {"role": "assistant", "content": "calculator(12 * 13)"},
        {"role": "tool", "content": "156"},
        {"role": "assistant", "content": "12 times 13 is 156."},
    ]
    ids, trainable, _ = encoder(tok).encode(conversation, 0)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    want = expected(
        tok,
        [
            (system + "<|im_start|>user\nMultiply 12 by 13.<|im_end|>\n<|im_start|>assistant\n", 0),
            ("calculator(12 * 13)<|im_end|>", 1),
            ("\n<|im_start|>tool\n156<|im_end|>\n<|im_start|>assistant\n", 0),
            ("12 times 13 is 156.<|im_end|>", 1),
            ("\n", 0),
        ],
    )
    assert runs(tok, ids, trainable) == want


def test_an_empty_assistant_turn_trains_its_end_of_turn_only(smollm2_tokenizer):
    tok = smollm2_tokenizer
    conversation = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": ""},
    ]
    ids, trainable, _ = encoder(tok).encode(conversation, 0)
    want = expected(
        tok,
        [
            ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", 0),
            ("<|im_end|>", 1),
            ("\n", 0),
        ],
    )
    assert runs(tok, ids, trainable) == want


def test_llama_style_template_masks_by_prefixes(llama_tokenizer):
    tok = llama_tokenizer
    enc = encoder(tok, LLAMA_PLAIN)
    assert not enc.generation_blocks
    ids, trainable, _ = enc.encode(CONVERSATION, 0)
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    want = expected(
        tok,
        [
            ("<|begin_of_text|>" + header.format("system") + "Be brief.<|eot_id|>", 0),
            (header.format("user") + "What is 2 plus 3?<|eot_id|>" + header.format("assistant"), 0),
            ("2 plus 3 is 5.<|eot_id|>", 1),
            (header.format("user") + "And 4 plus 4?<|eot_id|>" + header.format("assistant"), 0),
            ("4 plus 4 is 8.<|eot_id|>", 1),
        ],
    )
    assert runs(tok, ids, trainable) == want


def test_generation_blocks_are_used_as_they_are(llama_tokenizer):
    """The same template with {% generation %} blocks marks the same tokens through transformers."""
    plain = encoder(llama_tokenizer, LLAMA_PLAIN).encode(CONVERSATION, 0)
    blocks = encoder(llama_tokenizer, LLAMA_STYLE)
    assert blocks.generation_blocks
    assert blocks.encode(CONVERSATION, 0) == plain
    # A block that covers less than the prefix rule would: the mask follows the block, not the rule.
    narrow = LLAMA_STYLE.replace(
        "{{ message['content'] + '<|eot_id|>' }}{% endgeneration %}",
        "{{ message['content'] }}{% endgeneration %}{{ '<|eot_id|>' }}",
    )
    ids, trainable, _ = encoder(llama_tokenizer, narrow).encode(CONVERSATION, 0)
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert ids == plain[0] and all(t == 0 for i, t in zip(ids, trainable, strict=True) if i == eot)
    assert sum(trainable) == sum(plain[1]) - 2


def test_a_conversation_without_an_assistant_turn_is_skipped(smollm2_tokenizer):
    assert encoder(smollm2_tokenizer).encode([{"role": "user", "content": "Hello?"}], 0) == ([], [], False)


# -- the document delimiter -------------------------------------------------------------------
def test_the_delimiter_is_a_token_the_template_never_writes(smollm2_tokenizer, llama_tokenizer):
    # ChatML ends every turn with the EOS <|im_end|>; bos is <|im_start|>; unk <|endoftext|> is free.
    tok = smollm2_tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert tok.convert_ids_to_tokens(chat_delimiter_id(tok, chat_template_of(tok))) == "<|endoftext|>"
    assert llama_tokenizer.convert_ids_to_tokens(chat_delimiter_id(llama_tokenizer, LLAMA_PLAIN)) == "<|endoftext|>"
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    with pytest.raises(ValueError, match=r"^DataConfig.eos_id=\d+ \('<\|eot_id\|>'\) is written by the chat template"):
        chat_delimiter_id(llama_tokenizer, LLAMA_PLAIN, eos_id=eot)
    writes_all = LLAMA_PLAIN.replace("{{ '<|begin_of_text|>' }}", "{{ '<|begin_of_text|><|endoftext|>' }}")
    with pytest.raises(ValueError, match=r"every candidate document delimiter .* set DataConfig.eos_id"):
        chat_delimiter_id(llama_tokenizer, writes_all)


def test_a_conversation_holding_the_delimiter_is_refused(smollm2_tokenizer):
    bad = [{"role": "user", "content": "say <|endoftext|>"}, {"role": "assistant", "content": "no"}]
    with pytest.raises(ValueError, match=r"^conversation 7 of the test conversations contains the document delimiter"):
        encoder(smollm2_tokenizer).encode(bad, 7)


# -- packing ----------------------------------------------------------------------------------
def chat_config(source, tokenizer, **kw) -> DataConfig:
    kw = {"seq_len": 128, "batch_size": 2, "validation_fraction": 0.0, "prefetch": 0, "shuffle": False} | kw
    return DataConfig(source=source, messages_field="messages", tokenizer=str(tokenizer), **kw)


def test_packed_rows_hold_whole_conversations_with_hand_computed_labels(tmp_path, smollm2_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    conversations = [CONVERSATION, *generate_conversations(40)]
    loader = build_dataloader(chat_config(write_jsonl(tmp_path / "c.jsonl", conversations), smollm2_dir))
    delimiter = tok.convert_tokens_to_ids("<|endoftext|>")
    assert loader.eos_id == delimiter
    batches = [b for _, b in zip(range(6), loader, strict=False)]
    # Row 0 starts with CONVERSATION: its labels are the next token where that token is trained, else -100.
    ids, trainable, _ = encoder(tok).encode(CONVERSATION, 0)
    row_ids, row_labels = batches[0]["input_ids"][0].tolist(), batches[0]["labels"][0].tolist()
    n = len(ids)
    assert row_ids[: n + 1] == [*ids, delimiter]
    want = [ids[t + 1] if trainable[t + 1] else IGNORE_INDEX for t in range(n - 1)] + [IGNORE_INDEX, IGNORE_INDEX]
    assert row_labels[: n + 1] == want  # the delimiter is never a target, nor is what follows it
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    for batch in batches:
        docs = document_ids(batch["input_ids"], delimiter)
        for b in range(batch["input_ids"].shape[0]):
            row = batch["input_ids"][b].tolist()
            assert row[0] in (im_start, delimiter)  # a row starts a conversation (or is padding)
            for d in docs[b].unique().tolist():
                segment = [t for t, k in zip(row, docs[b].tolist(), strict=True) if k == d]
                if segment[0] == delimiter:
                    assert segment == [delimiter]  # row padding: one-token documents
                    continue
                text = tok.decode(segment)
                assert (
                    text.startswith("<|im_start|>")
                    and text.endswith("<|im_end|>\n<|endoftext|>")
                    or (
                        segment[-1] != delimiter and text.startswith("<|im_start|>")  # a conversation still going on
                    )
                ), text
            pos = batch["position_ids"][b]
            assert (pos == 0).sum() == len(docs[b].unique())  # positions restart with every document


def test_no_conversation_is_cut_by_a_row_boundary(tmp_path, llama_style_dir, llama_tokenizer):
    conversations = generate_conversations(60)
    loader = build_dataloader(chat_config(write_jsonl(tmp_path / "c.jsonl", conversations), llama_style_dir))
    begin = llama_tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    rows = [r for _, b in zip(range(8), loader, strict=False) for r in b["input_ids"].tolist()]
    # Each row is whole conversations, then padding: the rows' parts are the conversations, in order.
    encoded = [encoder(llama_tokenizer, LLAMA_PLAIN).encode(c, i)[0] for i, c in enumerate(conversations)]
    found = []
    for row in rows:
        assert row[0] in (begin, loader.eos_id)
        found += [p for p in _split(row, loader.eos_id) if p]
    assert len(found) > 16 and found == encoded[: len(found)]


def _split(row: list[int], delimiter: int) -> list[list[int]]:
    parts, current = [], []
    for t in row:
        if t == delimiter:
            parts.append(current)
            current = []
        else:
            current.append(t)
    return [*parts, current]


def test_a_conversation_longer_than_seq_len_is_cut_with_a_warning(tmp_path, llama_style_dir, llama_tokenizer):
    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(map(str, range(200)))}]
    short = [c for c in generate_conversations(30) if len(c) == 2]
    path = write_jsonl(tmp_path / "c.jsonl", [long, *short])
    with pytest.warns(UserWarning, match=r"1 conversations are longer than seq_len - 1 = 127 tokens and cut there"):
        loader = build_dataloader(chat_config(path, llama_style_dir, batch_size=1))
    first, second = (b["input_ids"][0].tolist() for _, b in zip(range(2), loader, strict=False))
    ids, trainable, _ = encoder(llama_tokenizer, LLAMA_PLAIN).encode(long, 0)
    assert len(ids) > 128 and first == [*ids[:127], loader.eos_id]  # cut, the delimiter in the last place
    short_ids = encoder(llama_tokenizer, LLAMA_PLAIN).encode(short[0], 1)[0]
    assert second[: len(short_ids) + 1] == [*short_ids, loader.eos_id]  # the next row starts the next conversation


def test_what_tokenizing_changed_is_told_once_for_both_splits(tmp_path, llama_style_dir):
    long = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(map(str, range(200)))}]
    path = write_jsonl(tmp_path / "c.jsonl", [long, *generate_conversations(40)])
    cfg = chat_config(path, llama_style_dir, batch_size=1, validation_fraction=0.2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_dataloader(cfg, split="train")
        build_dataloader(cfg, split="validation")
    told = [str(w.message) for w in caught if "longer than seq_len" in str(w.message)]
    assert len(told) == 1 and told[0].startswith(f"{path!r} (1 json file): 1 conversations are longer"), told


def test_chat_loader_resumes_exactly(tmp_path, llama_style_dir):
    path = write_jsonl(tmp_path / "c.jsonl", generate_conversations(80))
    cfg = chat_config(path, llama_style_dir, seq_len=64, shuffle=True)
    loader = build_dataloader(cfg)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    after = [next(it) for _ in range(3)]
    resumed = build_dataloader(cfg)
    resumed.load_state_dict(state)
    again = [b for _, b in zip(range(3), resumed, strict=False)]
    for a, b in zip(after, again, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_streaming_gives_the_same_documents(tmp_path, llama_style_dir):
    path = write_jsonl(tmp_path / "c.jsonl", generate_conversations(40))
    in_memory = build_dataloader(chat_config(path, llama_style_dir, seq_len=64))
    streamed = build_dataloader(chat_config(path, llama_style_dir, seq_len=64, streaming=True))
    for a, b in zip(in_memory, streamed, strict=False):
        assert all(torch.equal(a[k], b[k]) for k in a)
        break


# -- the default conversation set -------------------------------------------------------------
def test_default_conversation_set_is_deterministic_and_varied():
    a, b = generate_conversations(300), generate_conversations(300)
    assert a == b
    roles = {tuple(m["role"] for m in c) for c in a}
    assert ("user", "assistant", "user", "assistant") in roles  # multi-turn
    assert any(r[0] == "system" for r in roles) and any("tool" in r for r in roles)
    assert len({c[-1]["content"] for c in a}) > 200


def test_chat_prompt_ends_with_the_generation_prompt(smollm2_tokenizer):
    text = smollm2_tokenizer.decode(encoder(smollm2_tokenizer).prompt_ids("What is 2 plus 2?"))
    assert text.endswith("<|im_start|>user\nWhat is 2 plus 2?<|im_end|>\n<|im_start|>assistant\n")


# -- bad input: one line each -----------------------------------------------------------------
def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_role_the_template_rejects_names_the_conversation_and_role(tmp_path, llama_style_dir):
    bad = [
        {"role": "user", "content": "Hi"},
        {"role": "bot", "content": "Hello"},
        {"role": "assistant", "content": "Hi"},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION, bad])
    with pytest.raises(ValueError) as err:
        build_dataloader(chat_config(path, llama_style_dir))
    assert re.match(
        r"conversation 1 of '.*c\.jsonl' \(1 json file\): the chat template of '.*' rejects message 1 \(role 'bot'\): "
        r"unknown role bot$",
        one_line(err),
    )


def test_a_tokenizer_without_a_chat_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [CONVERSATION])
    with pytest.raises(ValueError) as err:
        build_dataloader(chat_config(path, "default"))
    assert "has no chat template, so conversations (DataConfig.messages_field) cannot be rendered" in one_line(err)


@pytest.mark.parametrize(
    "messages,match",
    [
        (["Hi", "Hello"], r"message 0 is str, not a \{'role', 'content'\} dict"),
        (
            [{"from": "human", "value": "Hi"}],
            r"message 0 has keys \['from', 'value'\]; each message needs a string 'role'",
        ),
        ([{"role": "user", "content": 3}], r"message 0, field 'content' holds int \(3\); content must be a string"),
        ([{"role": 1, "content": "Hi"}], r"message 0, field 'role' holds int \(1\); the role must be a string"),
    ],
)
def test_a_wrong_shape_names_the_conversation_and_message(tmp_path, llama_style_dir, llama_tokenizer, messages, match):
    path = write_jsonl(tmp_path / "c.jsonl", [messages, messages])  # a file of one shape: arrow unifies types
    with pytest.raises(ValueError) as err:
        build_dataloader(chat_config(path, llama_style_dir))
    assert re.match(r"conversation 0 of '.*c.jsonl' \(1 json file\): " + match, one_line(err))
    with pytest.raises(ValueError) as err:  # the encoder itself (streaming reads Python objects)
        encoder(llama_tokenizer).encode(messages, 5)
    assert re.match(r"conversation 5 of the test conversations: " + match, one_line(err))


# -- one odd record among good ones: datasets types the column as JSON ----------------------------


def _odd_file(tmp_path, odd: list[dict], name: str = "odd.jsonl") -> tuple[str, list[list[dict]]]:
    """Good conversations with ``odd`` (one conversation) second: the file and its conversations."""
    conversations = generate_conversations(12)
    conversations.insert(1, odd)
    return write_jsonl(tmp_path / name, conversations), conversations


def _all_batches(cfg: DataConfig) -> list[dict]:
    return list(build_dataloader(dataclasses.replace(cfg, num_epochs=1)))


@pytest.mark.parametrize("extra_key", [False, True], ids=["parts", "parts_and_extra_key"])
@pytest.mark.parametrize("streaming", [False, True], ids=["in_memory", "streaming"])
def test_one_record_of_another_shape_leaves_every_conversation_as_written(
    tmp_path, llama_style_dir, llama_tokenizer, streaming, extra_key
):
    """Content parts in one message (and an extra key in another) make datasets type the column as JSON; every
    conversation must still train on its own text (no JSON quotes), the parts joined as templates join them."""
    odd = [
        {"role": "user", "content": [{"type": "text", "text": "What is 2 "}, {"type": "text", "text": "plus 3?"}]},
        {"role": "assistant", "content": "2 plus 3 is 5."} | ({"name": "calculator"} if extra_key else {}),
    ]
    # A content that reads as JSON ("42") stays the string it is, though the column is typed as JSON.
    answer = [{"role": "user", "content": "6 times 7?"}, {"role": "assistant", "content": "42"}]
    path, conversations = _odd_file(tmp_path, odd)
    path = write_jsonl(tmp_path / "odd.jsonl", [*conversations, answer])
    assert not any('"' in m["content"] for c in conversations if c is not odd for m in c)
    plain = [[{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "2 plus 3 is 5."}]]
    reference = write_jsonl(tmp_path / "plain.jsonl", [conversations[0], *plain, *conversations[2:], answer])
    got = _all_batches(chat_config(path, llama_style_dir, streaming=streaming))
    want = _all_batches(chat_config(reference, llama_style_dir, streaming=streaming))
    trained = [t for b in got for t in b["labels"].flatten().tolist() if t != IGNORE_INDEX]
    assert trained and '"' not in llama_tokenizer.decode(trained)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("odd", "match"),
    [
        (
            [{"role": "user", "content": 3}, {"role": "assistant", "content": "3."}],
            r"message 0, field 'content' holds int \(3\); content must be a string or a list of \{'type': 'text'",
        ),
        (
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "image", "url": "x.png"}]}],
            r"message 1, field 'content', part 0 is type 'image'; only text parts .* can be trained on as text$",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 7}]}, {"role": "assistant", "content": "7."}],
            r"message 0, field 'content', part 0 is \{'type': 'text', 'text': 7\}; only text parts",
        ),
        ([{"role": "user", "content": {"text": "Hi"}}], r"message 0, field 'content' holds dict \(\{'text': 'Hi'\}\)"),
        ("Hi there", r"the messages field holds str, not a list of \{'role', 'content'\} messages"),
        (["Hi", "Hello"], r"message 0 is str, not a \{'role', 'content'\} dict"),
    ],
)
def test_one_bad_record_among_good_ones_is_named(tmp_path, llama_style_dir, odd, match):
    """The record that is wrong is named (conversation 1), not the file or conversation 0."""
    path, _ = _odd_file(tmp_path, odd)
    for streaming in (False, True):
        with pytest.raises(ValueError) as err:
            _all_batches(chat_config(path, llama_style_dir, streaming=streaming))
        assert re.match(r"conversation 1 of '.*odd.jsonl' \(1 json file\): " + match, one_line(err)), one_line(err)


def test_a_messages_field_of_text_is_refused(tmp_path, llama_style_dir):
    path = write_jsonl(tmp_path / "c.jsonl", ["Hi there", "Hello"])
    with pytest.raises(ValueError) as err:
        build_dataloader(chat_config(path, llama_style_dir))
    assert re.match(
        r"field 'messages' of .* holds .*string.*, not lists of \{'role', 'content'\} messages$", one_line(err)
    )
    with pytest.raises(ValueError) as err:  # a streamed column is checked conversation by conversation
        encoder(build_tokenizer(str(llama_style_dir))).encode("Hi there", 3)
    assert re.match(
        r"conversation 3 of .*: the messages field holds str, not a list of \{'role', 'content'\}", one_line(err)
    )
    with pytest.raises(ValueError, match=r"field 'conversation' is not in .*; its fields are \['messages'\]"):
        build_dataloader(dataclasses.replace(chat_config(path, llama_style_dir), messages_field="conversation"))


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path, llama_tokenizer):
    rewriting = "{{ messages | length }} messages\n" + LLAMA_PLAIN
    with pytest.raises(ValueError) as err:
        encoder(llama_tokenizer, rewriting).encode(CONVERSATION, 4)
    assert "conversation 4 of the test conversations: the chat template of" in one_line(err)
    assert "is not a prefix of the whole conversation" in str(err.value)


def test_config_refuses_two_kinds_of_fine_tuning_data():
    with pytest.raises(ValueError, match="two kinds of fine-tuning data; set one of them"):
        DataConfig(messages_field="messages", prompt_field="q", response_field="a")
    with pytest.raises(ValueError, match="set messages_field too"):
        DataConfig(chat_template="t.jinja")


def test_chat_template_file_replaces_the_tokenizers(tmp_path, llama_style_dir, llama_tokenizer):
    template = tmp_path / "t.jinja"
    template.write_text(LLAMA_PLAIN.replace("<|end_header_id|>\\n\\n", "<|end_header_id|>\\n"))
    path = write_jsonl(tmp_path / "c.jsonl", generate_conversations(20))
    loader = build_dataloader(chat_config(path, llama_style_dir, seq_len=64, chat_template=str(template)))
    row = loader.tokenizer.decode(next(iter(loader))["input_ids"][0].tolist())
    assert "<|end_header_id|>\n" in row and "<|end_header_id|>\n\n" not in row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FileNotFoundError, match="is not a file"):
            build_dataloader(chat_config(path, llama_style_dir, chat_template=str(tmp_path / "missing.jinja")))


# -- a chat run ---------------------------------------------------------------------------------
def test_a_chat_loader_samples_one_user_turn_and_stops_at_the_end_of_a_turn(tmp_path, llama_style_dir, llama_tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", generate_conversations(20))
    loader = build_dataloader(chat_config(path, llama_style_dir))
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert loader.record_kind == "chat" and loader.end_id == eot and loader.eos_id != eot
    assert loader.tokenizer.decode(loader.prompt_ids("What is 2 plus 2?")) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_a_chat_run_masks_by_the_delimiter_and_samples_through_the_template(tmp_path, llama_style_dir, llama_tokenizer):
    from recipe_utils import tiny_config

    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=3)
    cfg.data = chat_config(write_jsonl(tmp_path / "c.jsonl", generate_conversations(200)), llama_style_dir)
    cfg.data.validation_fraction = 0.1
    cfg.trainer.val_every, cfg.trainer.sample_prompt, cfg.trainer.sample_tokens = 0, "What is 2 plus 2?", 3
    result = Trainer(cfg).fit()
    assert result.status == "completed"
    eot = llama_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    prompt = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2 plus 2?<|eot_id|>"
    assert result.sample.startswith(prompt + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    exported = json.loads((result.hf_dir / "config.json").read_text())
    assert exported["eos_token_id"] == eot  # generation stops at the end of a turn, not at the delimiter
