"""LoRA through PEFT (peft=lora): only the adapters train; checkpoints hold them and resume exactly; the run
exports a PEFT adapter directory that PEFT loads onto a transformers model with nemo_lite's logits, and a
merged directory transformers loads alone; the base checkpoint on disk is never written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from model_utils import family_hf_model, random_ids, save_default_tokenizer  # noqa: E402
from recipe_utils import tiny_config  # noqa: E402

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.training.config import ConfigError, PeftSection  # noqa: E402
from nemo_lite.training.trainer import Trainer  # noqa: E402

HF_NAMES = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def write_base(path: Path, seed: int = 0, **changes) -> Path:
    """A random transformers Llama (vocabulary of the default tokenizer) saved as a Hugging Face directory;
    ``changes`` override its config fields."""
    import transformers

    eos = save_default_tokenizer(path)
    config = transformers.LlamaConfig(
        **{
            "vocab_size": 8192,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
            "eos_token_id": eos,
            **changes,
        }
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.iterdir()) if p.is_file())).hexdigest()


def lora_config(run_dir: Path, base: Path, *, backend: str = "sdpa", steps: int = 6):
    cfg = tiny_config(run_dir, backend=backend, steps=steps)
    cfg.model.pretrained_path = str(base)
    cfg.data.tokenizer = "model"
    cfg.peft.method, cfg.peft.r, cfg.peft.alpha = "lora", 4, 8.0
    cfg.trainer.save_every, cfg.trainer.val_every, cfg.trainer.sample_tokens = 3, 0, 4
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    before = digest(base)
    trainer = Trainer(lora_config(tmp_path_factory.mktemp("run"), base))
    trainer.setup()
    initial = {name: p.detach().clone() for name, p in trainer.raw_model.named_parameters()}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    result = trainer.fit()
    return trainer, result, initial, in_optimizer, before


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(trained, base):
    trainer, result, initial, in_optimizer, before = trained
    assert result.status == "completed" and len(result.losses) == 6
    params = dict(trainer.raw_model.named_parameters())
    adapters = {name for name in params if ".lora_A." in name or ".lora_B." in name}
    assert len(adapters) == 2 * 7 * 2  # A and B on 7 linears in each of 2 layers (all-linear)
    assert in_optimizer == {id(params[name]) for name in adapters}
    assert {name for name, p in params.items() if p.requires_grad} == adapters
    assert all(torch.equal(p, initial[name]) for name, p in params.items() if name not in adapters)
    assert all(not torch.equal(params[n], initial[n]) for n in adapters if ".lora_B." in n)  # B starts at 0
    assert digest(base) == before  # the base directory was only read


def test_a_checkpoint_holds_the_adapters_and_resumes_exactly(trained, base, tmp_path):
    from safetensors import safe_open

    trainer, result, *_ = trained
    ckpt = trainer.run_dir / "checkpoints" / "step_000003"
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        saved = set(f.keys())
    assert saved == {name for name, p in trainer.raw_model.named_parameters() if p.requires_grad}
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["peft"]["base"]["path"] == str(base.resolve()) and state["peft"]["r"] == 4
    cfg = lora_config(tmp_path / "resumed", base)
    cfg.trainer.resume = str(ckpt)
    resumed = Trainer(cfg).fit()
    assert resumed.losses == result.losses[3:]  # bit-equal


def test_the_adapter_directory_is_what_peft_writes_and_loads_with_our_logits(trained, base, tmp_path):
    import peft
    import transformers

    trainer, result, *_ = trained
    adapter = trainer.run_dir / "adapter"
    # What PEFT itself writes for a transformers model with the same settings.
    reference = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base),
        peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=HF_NAMES, task_type="CAUSAL_LM"),
    )
    reference.save_pretrained(tmp_path / "reference")
    ours, theirs = (json.loads((d / "adapter_config.json").read_text()) for d in (adapter, tmp_path / "reference"))
    for config in (ours, theirs):
        config["target_modules"] = sorted(config["target_modules"])
    assert ours["base_model_name_or_path"] == str(base)
    assert {k: v for k, v in ours.items() if k != "base_model_name_or_path"} == {
        k: v for k, v in theirs.items() if k != "base_model_name_or_path"
    }
    from nemo_lite.testing.lora import read_adapter_dir

    assert read_adapter_dir(adapter)[1] == read_adapter_dir(tmp_path / "reference")[1]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in read_adapter_dir(adapter)[1]

    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = random_ids(2, 40, 8192, seed=3)
    ids[ids == trainer.eos_id] = 5
    model = trainer.raw_model.eval()
    with torch.no_grad():
        diff = (model(ids) - loaded(input_ids=ids).logits).abs().max().item()
        moved = (model(ids) - transformers.AutoModelForCausalLM.from_pretrained(base)(input_ids=ids).logits).abs()
    assert diff <= 1e-4
    assert moved.max().item() > 1e-3  # the adapters changed the model: the comparison can fail


def test_the_merged_directory_loads_in_transformers_alone(trained, base):
    import transformers

    trainer, result, *_ = trained
    assert result.hf_dir == trainer.run_dir / "hf"
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir).eval()
    assert not any("lora" in name for name in merged.state_dict())
    ids = random_ids(2, 40, 8192, seed=4)
    ids[ids == trainer.eos_id] = 5
    with torch.no_grad():
        diff = (trainer.raw_model.eval()(ids) - merged(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
    assert transformers.AutoTokenizer.from_pretrained(result.hf_dir).eos_token_id == trainer.eos_id


@pytest.mark.parametrize("backend", ["flex", "eager", "varlen"])
def test_every_attention_backend_trains_the_same_adapters(trained, base, tmp_path, backend):
    _, result, *_ = trained
    cfg = lora_config(tmp_path, base, backend=backend, steps=3)
    cfg.trainer.export_hf, cfg.trainer.sample_tokens = False, 0
    losses = Trainer(cfg).fit().losses
    assert max(abs(a - b) for a, b in zip(losses, result.losses[:3], strict=True)) <= 1e-4


def test_compiled_blocks_trace_the_peft_layers_without_graph_breaks(trained, base, tmp_path, monkeypatch):
    """trainer.compile=true compiles each block holding PEFT's layers. Here with fullgraph=True (any graph
    break fails) and the aot_eager backend (dynamo's tracing and AOT autograd with frozen weights, without
    inductor's C++ build, which takes minutes on a small CPU and is not what LoRA changes)."""
    from nemo_lite.training import loss

    _, result, *_ = trained
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self: real_compile(self, backend="aot_eager", fullgraph=True)
    )
    monkeypatch.setattr(
        loss, "_compiled_head_loss", torch.compile(loss.head_cross_entropy_sum, backend="aot_eager", fullgraph=True)
    )
    cfg = lora_config(tmp_path, base, steps=3)
    cfg.trainer.compile, cfg.trainer.export_hf, cfg.trainer.sample_tokens = True, False, 0
    trainer = Trainer(cfg)
    losses = trainer.fit().losses
    assert trainer.model.layers[0]._compiled_call_impl is not None
    assert max(abs(a - b) for a, b in zip(losses, result.losses[:3], strict=True)) <= 1e-4


def test_the_fast_steps_fused_adamw_updates_only_the_adapters(trained, base, tmp_path):
    _, result, *_ = trained
    cfg = lora_config(tmp_path, base, steps=3)
    cfg.trainer.step_impl, cfg.trainer.export_hf, cfg.trainer.sample_tokens = "fast", False, 0
    trainer = Trainer(cfg)
    losses = trainer.fit().losses
    assert "fast step" in trainer.step_impl.description
    assert max(abs(a - b) for a, b in zip(losses, result.losses[:3], strict=True)) <= 1e-5


def test_a_second_family_with_qkv_biases_round_trips_through_peft_and_the_merge(tmp_path):
    """Qwen2 (q/k/v biases), adapters on two modules only: the adapter directory and the merged model give
    the logits of nemo_lite's LoRA model."""
    import peft
    import transformers

    from nemo_lite.components.models import AutoModelForCausalLM, family_of_checkpoint
    from nemo_lite.training.converters import lora

    family_hf_model("qwen2", seed=1).save_pretrained(tmp_path / "base")
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attention=AttentionConfig(backend="sdpa"))
    family = family_of_checkpoint(tmp_path / "base")
    section = PeftSection(method="lora", r=2, alpha=6.0, target_modules=["q_proj", "v_proj"])
    converter = lora.LoraConverter(section)
    converter.convert(ours, family)
    assert converter.module_paths == [f"layers.{i}.attention.{m}_proj" for i in (0, 1) for m in "qv"]
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    adapters = lora.adapter_tensors(ours)
    lora.save_adapter(
        adapters,
        tmp_path / "adapter",
        section=section,
        target_names=converter.target_names,
        base_model_name_or_path=None,
    )
    merged = lora.merged_model(
        family,
        tmp_path / "base",
        adapters,
        section=section,
        target_names=converter.target_names,
        attention=AttentionConfig(backend="sdpa"),
    )
    merged.save_pretrained(tmp_path / "hf")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    alone = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = random_ids(2, 24, 128, seed=5)
    with torch.no_grad():
        want = ours.eval()(ids)
        assert (want - with_adapter(input_ids=ids).logits).abs().max().item() <= 1e-4
        assert (want - alone(input_ids=ids).logits).abs().max().item() <= 1e-4


# ---- bad input: one line each ---------------------------------------------------------------------


def test_a_target_that_matches_nothing_lists_the_modules_that_exist(base, tmp_path):
    cfg = lora_config(tmp_path, base)
    cfg.peft.target_modules = ["q_proj", "qkv_proj"]
    with pytest.raises(ConfigError) as info:
        Trainer(cfg).fit()
    message = str(info.value)
    assert "qkv_proj" in message and ", ".join(HF_NAMES) in message and "\n" not in message


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: setattr(c.model, "pretrained_path", None), "model.pretrained_path is not set"),
        (lambda c: setattr(c.peft, "r", 0), "peft.r=0 must be an integer > 0"),
        (lambda c: setattr(c.peft, "alpha", 0.0), "peft.alpha=0.0 must be"),
        (lambda c: setattr(c.peft, "dropout", 1.0), r"peft.dropout=1.0 must be in \[0.0, 1.0\)"),
        (
            lambda c: setattr(c.peft, "target_modules", []),
            "peft.target_modules and peft.target_parameters are both empty",
        ),
        (lambda c: setattr(c.peft, "target_modules", ["all-linear", "q_proj"]), "give it alone"),
        (lambda c: setattr(c.peft, "method", "qlora"), "peft.method='qlora' is not valid; choose one of: none, lora"),
    ],
)
def test_contradictory_or_invalid_peft_options_are_refused_before_any_work(base, tmp_path, change, match):
    cfg = lora_config(tmp_path / "run", base)
    change(cfg)
    with pytest.raises(ConfigError, match=match) as info:
        Trainer(cfg)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_resume_against_another_base_or_without_lora_is_refused(trained, base, tmp_path):
    trainer, *_ = trained
    ckpt = trainer.run_dir / "checkpoints" / "step_000003"
    other = write_base(tmp_path / "other", seed=1)
    cfg = lora_config(tmp_path / "a", other)
    cfg.trainer.resume = str(ckpt)
    with pytest.raises(ConfigError, match="is a different checkpoint") as info:
        Trainer(cfg).fit()
    assert "\n" not in str(info.value)
    cfg = lora_config(tmp_path / "b", base)
    cfg.peft.method, cfg.trainer.resume = "none", str(ckpt)
    with pytest.raises(ConfigError, match="holds LoRA adapters only"):
        Trainer(cfg).fit()
    cfg = lora_config(tmp_path / "c", base)
    cfg.peft.r, cfg.trainer.resume = 8, str(ckpt)
    with pytest.raises(ConfigError, match="peft r=4 and this run asks for 8"):
        Trainer(cfg).fit()


def test_resume_with_another_alpha_is_refused_naming_saved_and_now(trained, base, tmp_path):
    # alpha scales every adapter's update (W + alpha / r * B @ A): another alpha is another function.
    trainer, *_ = trained
    cfg = lora_config(tmp_path / "a", base)
    cfg.peft.alpha, cfg.trainer.resume = 16.0, str(trainer.run_dir / "checkpoints" / "step_000003")
    with pytest.raises(ConfigError, match=r"peft alpha=8\.0 and this run asks for 16\.0") as info:
        Trainer(cfg).fit()
    assert "\n" not in str(info.value)
    assert not list((tmp_path / "a").glob("checkpoints/step_*"))


def test_every_key_of_the_adapter_record_is_compared_on_resume(tmp_path):
    # What a later adapter setting puts into the record (e.g. a variant of the update) is refused when it differs,
    # without check_record naming it; only the base is compared by its fingerprint, and dropout is not recorded
    # (it does not change the function a checkpoint computes).
    from nemo_lite.training.converters.lora import LoraConverter

    base = {"path": "/b", "sha256": "x", "covers": "every byte"}
    saved = {"method": "lora", "r": 4, "alpha": 8.0, "targets": ["q_proj"], "parameters": [], "base": base}
    LoraConverter.check_record(tmp_path, saved, dict(saved))
    LoraConverter.check_record(tmp_path, {k: v for k, v in saved.items() if k != "parameters"}, saved)  # older
    with pytest.raises(ConfigError, match=r"peft variant='plain' and this run asks for 'other'"):
        LoraConverter.check_record(tmp_path, {**saved, "variant": "plain"}, {**saved, "variant": "other"})


@pytest.mark.parametrize("where", [0.25, 0.4, 0.9])
def test_the_base_fingerprint_catches_one_byte_changed_anywhere(tmp_path, where):
    from safetensors.torch import save_file

    from nemo_lite.training.converters.lora import base_fingerprint

    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(8 * 2**20, dtype=torch.int32).to(torch.uint8)}, weights)  # 8 MiB of data
    before = base_fingerprint(tmp_path)["sha256"]
    data = bytearray(weights.read_bytes())
    data[int(len(data) * where)] ^= 1
    weights.write_bytes(bytes(data))
    assert base_fingerprint(tmp_path)["sha256"] != before
    data[int(len(data) * where)] ^= 1
    weights.write_bytes(bytes(data))
    assert base_fingerprint(tmp_path)["sha256"] == before


def test_a_checkpoint_recording_the_older_sampled_fingerprint_still_resumes_on_its_base(base, tmp_path):
    from nemo_lite.training.converters.lora import _sampled_digest, base_fingerprint, same_base

    current = base_fingerprint(base)
    older = {"path": str(base), "sha256": _sampled_digest(base.resolve())}  # what checkpoints recorded before
    assert same_base(older, current) and same_base(current, current)
    other = base_fingerprint(write_base(tmp_path / "other", seed=1))
    assert not same_base(older, other) and not same_base(current, other)
