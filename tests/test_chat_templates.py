"""Templates that rewrite earlier turns, with Qwen3's real stock chat template (nemo_lite.testing.chat_templates,
as Qwen/Qwen3-0.6B ships it): refused by prefix rendering with a message naming the shipped generation-marked
copy, and that copy renders the very same text while marking exactly what each assistant turn writes."""

from __future__ import annotations

import json

import pytest

from nemo_lite.components.datasets import DataConfig, build_dataloader
from nemo_lite.components.datasets.chat import (
    SHIPPED_TEMPLATES,
    TEMPLATES_DIR,
    ChatEncoder,
    chat_delimiter_id,
    chat_template_of,
    shipped_template,
    shipped_variant_of,
    uses_generation_blocks,
)
from nemo_lite.testing.chat_templates import QWEN3_STOCK_TEMPLATE
from nemo_lite.testing.chat_templates import qwen_style_tokenizer as make_qwen_style_tokenizer

QWEN3_STOCK = QWEN3_STOCK_TEMPLATE

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n2 plus 3 is 5."},
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "4 plus 4 is 8."},
]
TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
# Conversations that take every branch of the template: thinking in the content and in reasoning_content, tool
# calls and tool responses, a system prompt or none, one turn or several.
CONVERSATIONS = [
    MULTI_TURN,
    MULTI_TURN[1:3],
    [*MULTI_TURN[1:3], {"role": "user", "content": "Thanks"}],
    [
        {"role": "user", "content": "Add 2 and 3."},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Use the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
        },
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": "(checked)"},
        {"role": "assistant", "content": "It is 5."},
        {"role": "user", "content": "And 1 and 1?"},
        {
            "role": "assistant",
            "content": "Calling.",
            "tool_calls": [
                {"function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}},
                {"name": "add", "arguments": {}},
            ],
        },
    ],
]


@pytest.fixture(scope="module")
def qwen_style_tokenizer():
    return make_qwen_style_tokenizer()


def encoder(tokenizer, template: str) -> ChatEncoder:
    return ChatEncoder(
        tokenizer,
        "messages",
        template=template,
        delimiter_id=chat_delimiter_id(tokenizer, template),
        max_tokens=10_000,
        description="the test conversations",
    )


def trained_text(tokenizer, ids: list[int], trainable: list[int]) -> list[str]:
    """The text of each run of trained tokens."""
    runs, current = [], []
    for token, flag in zip([*ids, None], [*trainable, 0], strict=True):
        if flag:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_the_stock_qwen3_template_is_refused_naming_the_key_of_its_marked_copy(qwen_style_tokenizer):
    assert shipped_variant_of(QWEN3_STOCK) == "qwen3"
    assert shipped_variant_of(QWEN3_STOCK + "\n") == "qwen3"  # a file's trailing newline is not a change
    with pytest.raises(ValueError) as err:
        encoder(qwen_style_tokenizer, QWEN3_STOCK).encode(MULTI_TURN, 3)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("conversation 3 of the test conversations: the chat template of")
    assert "(it rewrites earlier turns)" in message
    assert message.endswith(
        "pass data.chat_template=qwen3 (the same template with {% generation %} blocks, shipped with nemo_lite)"
    )


def test_another_rewriting_template_is_told_how_to_mark_its_turns(qwen_style_tokenizer):
    rewriting = "{{ messages | length }} messages\n" + QWEN3_STOCK
    with pytest.raises(ValueError, match=r"wrap what each assistant turn writes in \{% generation %\}.*=FILE"):
        encoder(qwen_style_tokenizer, rewriting).encode(MULTI_TURN, 0)


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["multi-turn", "one-turn", "user-last", "tools"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_the_shipped_qwen3_copy_renders_the_stock_text(qwen_style_tokenizer, conversation, generation_prompt):
    variant = shipped_template("qwen3")
    for tools in (None, TOOLS):
        for thinking in ({}, {"enable_thinking": False}):
            stock, ours = (
                qwen_style_tokenizer.apply_chat_template(
                    conversation,
                    chat_template=template,
                    tools=tools,
                    tokenize=False,
                    add_generation_prompt=generation_prompt,
                    **thinking,
                )
                for template in (QWEN3_STOCK, variant)
            )
            assert ours == stock


def test_the_shipped_qwen3_copy_trains_what_each_assistant_turn_writes(qwen_style_tokenizer):
    tok = qwen_style_tokenizer
    ids, trainable, _ = encoder(tok, shipped_template("qwen3")).encode(MULTI_TURN, 0)
    assert tok.decode(ids) == tok.apply_chat_template(MULTI_TURN, chat_template=QWEN3_STOCK, tokenize=False)
    # The earlier turn's thinking is dropped by the template (as Qwen3 sees a conversation at inference); the
    # last turn after the last user message gets the empty thinking block, which the model writes itself.
    assert trained_text(tok, ids, trainable) == [
        "2 plus 3 is 5.<|im_end|>",
        "<think>\n\n</think>\n\n4 plus 4 is 8.<|im_end|>",
    ]


def test_on_one_turn_the_copy_marks_what_prefix_rendering_of_the_stock_template_finds(qwen_style_tokenizer):
    for conversation in (MULTI_TURN[1:3], [MULTI_TURN[0], *MULTI_TURN[3:]]):
        stock = encoder(qwen_style_tokenizer, QWEN3_STOCK).encode(conversation, 0)
        assert encoder(qwen_style_tokenizer, shipped_template("qwen3")).encode(conversation, 0) == stock


def test_data_chat_template_selects_a_shipped_template_by_name(tmp_path, qwen_style_tokenizer):
    qwen_style_tokenizer.save_pretrained(str(tmp_path / "tok"))
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"messages": MULTI_TURN}) + "\n" for _ in range(8)))
    cfg = DataConfig(
        source=str(source),
        messages_field="messages",
        tokenizer=str(tmp_path / "tok"),
        chat_template="qwen3",
        seq_len=128,
        batch_size=2,
        validation_fraction=0.0,
        prefetch=0,
        shuffle=False,
    )
    batch = next(iter(build_dataloader(cfg)))
    assert int((batch["labels"] != -100).sum()) > 0
    assert set(SHIPPED_TEMPLATES) == {p.stem for p in TEMPLATES_DIR.glob("*.jinja")}
    for name, stock in SHIPPED_TEMPLATES.items():  # each marks assistant tokens and stands for stock templates
        assert uses_generation_blocks(shipped_template(name)) and stock
        assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in stock)
    with pytest.raises(FileNotFoundError, match=r"is not a file \(a Jinja chat template\) nor a template nemo_lite "):
        chat_template_of(qwen_style_tokenizer, "qwen9")


def test_a_shipped_template_is_found_by_its_file_and_needs_its_sidecar(tmp_path, monkeypatch):
    from nemo_lite.components.datasets import chat

    monkeypatch.setattr(chat, "TEMPLATES_DIR", tmp_path)
    (tmp_path / "mine.jinja").write_text("{% generation %}{{ messages }}{% endgeneration %}")
    with pytest.raises(FileNotFoundError, match=r"^shipped chat template mine.jinja has no mine.json beside it$"):
        chat._shipped_templates()
    (tmp_path / "mine.json").write_text(json.dumps({"stock_of": "me", "stock_sha256": ["ab" * 32]}))
    assert chat._shipped_templates() == {"mine": ("ab" * 32,)}
