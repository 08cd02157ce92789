"""Qwen3's stock chat template, as Qwen/Qwen3-0.6B ... 32B ship it (``qwen3_stock_chat_template.jinja``, the text of
their tokenizer_config.json), and a small tokenizer with its special tokens: what the tests of templates that
rewrite earlier turns run on, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

QWEN3_STOCK_TEMPLATE = (Path(__file__).parent / "qwen3_stock_chat_template.jinja").read_text(encoding="utf-8")


def qwen_style_tokenizer() -> Any:
    """The default corpus tokenizer with Qwen3's ChatML and thinking tokens, its EOS ``<|im_end|>`` (as
    Qwen3's) and the stock template as its own."""
    from nemo_lite.components.datasets import build_tokenizer

    tokenizer = build_tokenizer("default")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>", "<tool_call>", "</tool_call>"])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = QWEN3_STOCK_TEMPLATE
    return tokenizer
