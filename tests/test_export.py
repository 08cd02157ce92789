"""What an export carries besides the weights, checked through transformers: the chat template the run trained
with as the tokenizer's own (in hf/ and adapter/, also for a base model that had none), every eos id with a
generation_config.json that ``generate`` stops by, and the weights in trainer.export_dtype (default: the source
checkpoint's dtype, float32 from scratch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from model_utils import save_default_tokenizer
from recipe_utils import tiny_config

from nemo_lite.components.datasets import DataConfig
from nemo_lite.components.datasets.default_chat import generate_conversations
from nemo_lite.training.config import ConfigError
from nemo_lite.training.trainer import Trainer

# A template for a base model that has none (written for this test).
TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]


def write_base(path: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[Path, int]:
    """A random transformers Llama on the default tokenizer (no chat template), saved in ``dtype``; returns the
    directory and the tokenizer's EOS id."""
    import transformers

    eos = save_default_tokenizer(path)
    config = transformers.LlamaConfig(
        vocab_size=8192,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(path)
    return path, eos


def stored_dtypes(directory: Path) -> set[torch.dtype]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        names = f.keys()
        return {f.get_tensor(name).dtype for name in names}


def finetune_config(run_dir: Path, base: Path, **data):
    cfg = tiny_config(run_dir, backend="sdpa", steps=2)
    cfg.model.pretrained_path = str(base)
    cfg.data.tokenizer = "model"
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.trainer.val_every, cfg.trainer.sample_tokens = 0, 0
    return cfg


def test_the_chat_template_of_the_run_travels_with_the_export_and_the_adapter(tmp_path):
    import transformers

    base, _ = write_base(tmp_path / "base")
    with pytest.raises(ValueError):  # a base model: its tokenizer has no chat template
        transformers.AutoTokenizer.from_pretrained(base).apply_chat_template(QUESTION, tokenize=False)
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"messages": c}) + "\n" for c in generate_conversations(40)))
    template = tmp_path / "template.jinja"
    template.write_text(TEMPLATE)
    cfg = finetune_config(
        tmp_path / "run", base, source=str(source), messages_field="messages", chat_template=str(template)
    )
    cfg.data.seq_len = 256
    cfg.peft.method, cfg.peft.r, cfg.peft.alpha = "lora", 4, 8.0
    result = Trainer(cfg).fit()
    assert result.status == "completed"
    for exported in (result.hf_dir, result.run_dir / "adapter"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
        rendered = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
        assert rendered == "### user:\nWhat is 2 plus 3?\n### assistant:\n", exported
        on_disk = json.loads((exported / "tokenizer_config.json").read_text())
        assert on_disk["chat_template"] == TEMPLATE  # for transformers versions that read only this one
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_every_eos_id_travels_and_generate_stops_at_each(tmp_path):
    """A Llama-3-Instruct-style checkpoint stops at several ids. The second one is made the token greedy decoding
    writes first, so only a generate that knows the whole list stops after one token."""
    import transformers

    base, eos = write_base(tmp_path / "base", dtype=torch.bfloat16)
    prompt = torch.tensor([[5, 17, 300, 41]])
    reference = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    first = int(reference.generate(prompt, max_new_tokens=1, do_sample=False)[0, -1])
    assert first != eos
    stops = [eos, first, 8191]
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "eos_token_id": stops}))
    generation = json.loads((base / "generation_config.json").read_text())
    sampling = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (base / "generation_config.json").write_text(json.dumps({**generation, **sampling, "eos_token_id": stops}))

    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of some text to fine-tune on\n" for i in range(200)))
    cfg = finetune_config(tmp_path / "run", base, source=str(text))
    cfg.optim.lr = 1e-12  # the weights stay those of the base once written in bfloat16
    result = Trainer(cfg).fit()

    exported = json.loads((result.hf_dir / "config.json").read_text())
    written = json.loads((result.hf_dir / "generation_config.json").read_text())
    assert exported["eos_token_id"] == written["eos_token_id"] == stops
    assert written["bos_token_id"] == eos and {k: written[k] for k in sampling} == sampling
    assert exported["dtype"] == "bfloat16"  # trainer.export_dtype=auto: the base's dtype
    assert stored_dtypes(result.hf_dir) == {torch.bfloat16}
    model = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32).eval()
    assert transformers.GenerationConfig.from_pretrained(result.hf_dir).eos_token_id == stops
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out[0, len(prompt[0]) :].tolist() == [first]  # stopped at the second eos id
    only_first = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=eos)
    assert only_first.shape[1] == prompt.shape[1] + 5  # with the first id alone it runs on


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("float16", torch.float16)])
def test_export_dtype_chooses_the_weights_dtype(tmp_path, name, dtype):
    base, _ = write_base(tmp_path / "base", dtype=torch.bfloat16)
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i}\n" for i in range(200)))
    cfg = finetune_config(tmp_path / "run", base, source=str(text))
    cfg.trainer.export_dtype = name
    result = Trainer(cfg).fit()
    assert stored_dtypes(result.hf_dir) == {dtype}
    assert json.loads((result.hf_dir / "config.json").read_text())["dtype"] == name


def test_a_model_from_scratch_exports_float32_stopping_at_its_end_of_document(tmp_path):
    cfg = tiny_config(tmp_path / "run", backend="sdpa", steps=1)
    cfg.data = DataConfig(source="default", seq_len=64, batch_size=2, validation_fraction=0.0, prefetch=0)
    cfg.trainer.val_every, cfg.trainer.sample_tokens = 0, 0
    trainer = Trainer(cfg)
    result = trainer.fit()
    written = json.loads((result.hf_dir / "generation_config.json").read_text())
    assert written["eos_token_id"] == trainer.train_loader.end_id
    assert json.loads((result.hf_dir / "config.json").read_text())["dtype"] == "float32"


def test_a_bad_export_dtype_is_refused_in_one_line(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.trainer.export_dtype = "fp8"
    with pytest.raises(ConfigError) as err:
        Trainer(cfg)
    assert str(err.value) == (
        "trainer.export_dtype='fp8' is not valid; choose one of: auto, float32, bfloat16, float16"
    )
