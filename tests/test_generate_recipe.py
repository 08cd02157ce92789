"""recipes/generate.py offline: a Hugging Face directory or a run_dir, with or without a PEFT adapter, a prompt or
a file of prompts -> the jsonl, whose tokens are what transformers (and PEFT) generate greedily."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_utils import family_hf_model, save_default_tokenizer

from nemo_lite.cli import parse_args
from nemo_lite.errors import ConfigError
from nemo_lite.inference import GenerateConfig, run_generate

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["The cat sat on", "Once upon a time there was a small", "Numbers: 1 2 3"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    eos = save_default_tokenizer(path)
    model = family_hf_model("qwen3", seed=7, vocab_size=8192, bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(path)
    return path, model


def _greedy(model, tokenizer, prompt: str, new: int) -> list[int]:
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(ids) :].tolist()


def test_a_file_of_prompts_gives_transformers_greedy_tokens_in_the_jsonl(checkpoint, tmp_path):
    import transformers

    path, theirs = checkpoint
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    args = [f"checkpoint={path}", f"prompts_file={tmp_path / 'prompts.txt'}", "max_new_tokens=7", "batch_size=2"]
    out = run_generate(parse_args(GenerateConfig, [*args, f"out={tmp_path / 'g.jsonl'}"]))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == [_greedy(theirs, tokenizer, p, 7) for p in PROMPTS]
    assert all(r["text"] == tokenizer.decode(r["tokens"], skip_special_tokens=True) for r in rows)


def test_a_run_dir_with_a_peft_adapter_generates_what_peft_generates(checkpoint, tmp_path):
    import peft
    import transformers

    path, _ = checkpoint
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    torch.manual_seed(0)
    adapted = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # adapters large enough to change what is generated
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.mul_(20)
    adapted.save_pretrained(tmp_path / "adapter")
    run_dir = tmp_path / "run"
    (run_dir / "hf").mkdir(parents=True)
    for file in Path(path).iterdir():
        (run_dir / "hf" / file.name).write_bytes(file.read_bytes())

    command = [sys.executable, str(REPO / "recipes" / "generate.py"), f"checkpoint={run_dir}"]
    done = subprocess.run(
        [*command, f"adapter={tmp_path / 'adapter'}", f"prompt={PROMPTS[0]}", "max_new_tokens=6"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert row["tokens"] == _greedy(adapted, tokenizer, PROMPTS[0], 6)
    plain = _greedy(transformers.AutoModelForCausalLM.from_pretrained(path), tokenizer, PROMPTS[0], 6)
    assert row["tokens"] != plain  # the adapter was merged in
    assert done.stdout.startswith(PROMPTS[0]) and row["text"] in done.stdout  # streamed after the prompt
    assert "tokens/s" in done.stderr.splitlines()[-1]


def test_bad_generate_arguments_are_refused_in_one_line(checkpoint, tmp_path):
    path, _ = checkpoint
    with pytest.raises(ConfigError, match="pass exactly one of prompt=TEXT or prompts_file=FILE"):
        run_generate(parse_args(GenerateConfig, [f"checkpoint={path}"]))
    with pytest.raises(ConfigError, match="chat=true but the tokenizer of .* has no chat template; pass chat=false"):
        run_generate(parse_args(GenerateConfig, [f"checkpoint={path}", "prompt=x", "chat=true", f"out={tmp_path}/o"]))
    with pytest.raises(ConfigError, match="unknown key 'promt'; keys: checkpoint, adapter, prompt"):
        parse_args(GenerateConfig, ["promt=x"])
    with pytest.raises(ConfigError, match="is neither a run_dir with an hf/ export nor a Hugging Face directory"):
        run_generate(parse_args(GenerateConfig, [f"checkpoint={tmp_path}", "prompt=x"]))


def test_with_a_chat_template_a_prompt_is_a_user_turn_with_the_generation_prompt(checkpoint, tmp_path, monkeypatch):
    import shutil

    import transformers

    path, theirs = checkpoint
    chat_dir = tmp_path / "chat"
    shutil.copytree(path, chat_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(chat_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    tokenizer.save_pretrained(chat_dir)
    monkeypatch.chdir(tmp_path)  # without out= nor a run_dir, the jsonl goes to ./generations.jsonl
    out = run_generate(parse_args(GenerateConfig, [f"checkpoint={chat_dir}", "prompt=Hi there", "max_new_tokens=5"]))
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        reference = theirs.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert row["tokens"] == reference[0, len(ids) :].tolist()
    assert (tmp_path / "generations.jsonl").is_file()
