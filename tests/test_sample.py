"""The end-of-run sample: generated over the KV cache with a causal view of the prompt, so that a chat run's
answer is what transformers' greedy ``generate`` gives on the run's own export for the same templated prompt
(a run trained with block-causal masks split at the end of each turn must not split the prompt there)."""

from __future__ import annotations

import pytest
import torch
from recipe_utils import tiny_config
from test_data_chat import LLAMA_PLAIN, chat_config, write_jsonl

from nemo_lite.components.datasets import build_tokenizer
from nemo_lite.components.datasets.default_chat import generate_conversations
from nemo_lite.training.trainer import Trainer


@pytest.fixture
def chat_tokenizer_dir(tmp_path):
    """The default tokenizer with Llama-3's header and end-of-turn tokens and a Llama-style template, saved."""
    tokenizer = build_tokenizer("default")
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.eos_token, tokenizer.chat_template = "<|eot_id|>", LLAMA_PLAIN
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return tmp_path / "tokenizer"


def test_a_chat_sample_answers_the_templated_question_as_transformers_does_on_the_export(tmp_path, chat_tokenizer_dir):
    import transformers

    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=2)
    cfg.attention.attn_mask_type = "block_causal"
    # Large random weights and a small learning rate: a model whose every next token depends on the whole
    # prompt, so an answer generated without the question (the prompt split at its end of turn) differs.
    cfg.model.overrides, cfg.optim.lr = {"initializer_range": 0.5}, 1e-4
    cfg.data = chat_config(write_jsonl(tmp_path / "c.jsonl", generate_conversations(200)), chat_tokenizer_dir)
    cfg.trainer.val_every, cfg.trainer.sample_tokens = 0, 12
    result = Trainer(cfg).fit()
    assert result.status == "completed"

    tokenizer = transformers.AutoTokenizer.from_pretrained(result.hf_dir)
    question = "What is 12 times 3?"  # the chat kind's own prompt: trainer.sample_prompt is unset
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    reference = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32).eval()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert reference.config.eos_token_id == eot
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    answer = out[0, len(prompt) :].tolist()
    assert result.sample == tokenizer.decode(prompt + answer)
    assert question in result.sample and result.sample.startswith(tokenizer.decode(prompt))
