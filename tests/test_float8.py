"""Float8 training (float8.enabled=true) on CPU: which linears the rule converts, the one-line refusals, the
llama-3.2-3b preset, and the trainer's wiring with torchao's emulation (float8 rounding, high-precision
matmuls): converted before activation checkpointing and compile, the fast step's weight copies leave the
float8 linears alone, checkpoints and the export stay plain float32 under unchanged names, resume is exact."""

from __future__ import annotations

import importlib.util
import os
import signal

import pytest
import torch
from safetensors import safe_open
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import LlamaForCausalLM, family_of_preset, get_preset
from nemo_lite.testing.data import SyntheticPackedLoader
from nemo_lite.testing.hooks import after_each_step
from nemo_lite.training.config import ConfigError, Float8Section, RecipeConfig, validate
from nemo_lite.training.converters.float8 import Float8Converter, float8_keep_reason, float8_missing

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed (pip install 'nemo_lite[float8]')")
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# A shape small enough for a CPU whose MLP up-projections pass the tensorwise rule (1040 > 1024 outputs)
# while everything else stays in high precision.
SMALL = {"intermediate_size": 1040, "vocab_size": 512, "eos_token_id": 3}


def converted_by_rule(preset: str, recipe: str) -> list[str]:
    c = get_preset(preset)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {  # (out_features, in_features) of each decoder linear
        "q_proj": (q, c.hidden_size),
        "k_proj": (kv, c.hidden_size),
        "v_proj": (kv, c.hidden_size),
        "o_proj": (c.hidden_size, q),
        "gate_proj": (c.intermediate_size, c.hidden_size),
        "up_proj": (c.intermediate_size, c.hidden_size),
        "down_proj": (c.hidden_size, c.intermediate_size),
    }
    return [name for name in LINEARS if float8_keep_reason(*shapes[name], recipe) is None]


def test_the_layer_rule_on_the_llama_shapes():
    everything_but_kv = ["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert converted_by_rule("llama-3.2-1b", "tensorwise") == everything_but_kv
    assert converted_by_rule("llama-3.2-1b", "rowwise") == ["gate_proj", "up_proj"]
    assert converted_by_rule("llama-3.2-3b", "tensorwise") == everything_but_kv
    assert converted_by_rule("llama-3.2-3b", "rowwise") == everything_but_kv
    assert converted_by_rule("tiny", "tensorwise") == []
    assert float8_keep_reason(4104, 4096, "tensorwise") == "not multiples of 16"
    assert float8_keep_reason(8192, 2056, "rowwise") == "not multiples of 16"


def test_llama_3_2_3b_preset_has_the_released_model_size():
    with torch.device("meta"):
        model = LlamaForCausalLM(
            get_preset("llama-3.2-3b"), attention=AttentionConfig(backend="sdpa", attn_mask_type="causal")
        )
    assert sum(p.numel() for p in model.parameters()) == 3_212_749_824  # Llama-3.2-3B, tied embedding once


def test_a_recipe_torchao_does_not_have_is_refused_in_one_line():
    cfg = RecipeConfig()
    cfg.float8.recipe = "delayed"
    with pytest.raises(
        ConfigError, match=r"^float8.recipe='delayed' is not valid; choose one of: tensorwise, rowwise$"
    ):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^float8.recipe='delayed' is not valid"):
        Float8Converter(cfg.float8)


def test_without_torchao_the_refusal_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    family = family_of_preset("tiny")
    model = family.build(family.preset("tiny", **SMALL))
    with pytest.raises(ConfigError) as err:
        Float8Converter(Float8Section(enabled=True)).convert(model, family)
    assert (
        str(err.value) == "float8.enabled=true needs torchao, which is not installed: pip install 'nemo_lite[float8]'"
    )


@needs_torchao
def test_on_a_cpu_the_refusal_names_the_gpu_it_needs():
    family = family_of_preset("tiny")
    model = family.build(family.preset("tiny", **SMALL))
    with pytest.raises(ConfigError) as err:
        Float8Converter(Float8Section(enabled=True)).convert(model, family)
    assert str(err.value) == (
        "float8.enabled=true needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later); "
        "this run is on cpu"
    )
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # nothing changed


@needs_torchao
def test_on_a_gpu_older_than_ada_the_refusal_names_the_card(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert float8_missing(torch.device("cuda", 0)) == (
        "a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper or later); NVIDIA A100-SXM4-80GB has 8.0: "
        "leave float8.enabled=false"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert float8_missing(torch.device("cuda", 0)) is None


def small_model(tie: bool = True):
    family = family_of_preset("tiny")
    model = family.build(
        family.preset("tiny", tie_word_embeddings=tie, **SMALL), attention=AttentionConfig(backend="sdpa")
    )
    model.init_weights(seed=0)
    return family, model


@needs_torchao
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_the_converter_swaps_the_linears_the_rule_picks_and_keeps_names_and_values(tie):
    from torchao.float8.float8_linear import Float8Linear

    family, model = small_model(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converter = Float8Converter(Float8Section(enabled=True), emulate=True)
    converter.convert(model, family)
    swapped = sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))
    assert swapped == [f"layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj")]
    if not tie:
        assert type(model.lm_head) is nn.Linear  # the output projection stays
    after = model.state_dict()
    assert list(after) == list(before)
    for name, value in after.items():
        assert type(value) is torch.Tensor and value.dtype == torch.float32, name
        assert torch.equal(value, before[name]), name
    assert converter.description == (
        "float8 (tensorwise, emulated): converted mlp.gate_proj (2/2 blocks), mlp.up_proj (2/2 blocks); kept in "
        "high precision: attention.q_proj (too small to gain, 64x64), attention.k_proj (too small to gain, 32x64), "
        "attention.v_proj (too small to gain, 32x64), attention.o_proj (too small to gain, 64x64), mlp.down_proj "
        "(too small to gain, 64x1040), the output projection"
    )


@needs_torchao
def test_lora_adapters_stay_in_high_precision_while_their_base_layer_converts():
    peft = pytest.importorskip("peft")
    from torchao.float8.float8_linear import Float8Linear

    family, model = small_model()
    # lora_B of up_proj is 1040 x 16: by size alone the tensorwise rule would convert it.
    peft.inject_adapter_in_model(peft.LoraConfig(r=16, target_modules=["up_proj"]), model)
    converter = Float8Converter(Float8Section(enabled=True), emulate=True)
    converter.convert(model, family)
    swapped = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert "layers.0.mlp.up_proj.base_layer" in swapped and "layers.0.mlp.gate_proj" in swapped
    assert not any("lora_" in name for name in swapped)
    assert "4 adapter linears" in converter.description


@needs_torchao
def test_the_fast_steps_weight_copies_leave_the_float8_linears_alone():
    """The fast step gives exact-type nn.Linear layers a bf16 weight copy; a Float8Linear reads its float32
    weight and casts it itself, so it must keep its weight and get its gradient on .grad."""
    from torchao.float8.float8_linear import Float8Linear

    from nemo_lite.training.fast.swaps import CopyLinear, swap_in_weight_copies, swapped_weights

    family, model = small_model()
    Float8Converter(Float8Section(enabled=True), emulate=True).convert(model, family)
    float8_weights = {id(m.weight) for m in model.modules() if isinstance(m, Float8Linear)}
    taken = swapped_weights(model, model.output_weight, copies=True, rows=False)
    assert float8_weights and not float8_weights & {id(p) for p in taken}
    copies = swap_in_weight_copies(model, model.output_weight)
    assert not float8_weights & {id(p) for p in copies}
    assert sum(isinstance(m, Float8Linear) for m in model.modules()) == 4
    assert sum(isinstance(m, CopyLinear) for m in model.modules()) == 10  # q, k, v, o, down in 2 blocks


def recipe(tmp_path, name: str, steps: int = 6) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.run_dir = str(tmp_path / name)
    cfg.model.preset = "tiny"
    cfg.model.vocab_from_tokenizer = False
    cfg.model.overrides = dict(SMALL)
    cfg.attention.backend = "sdpa"
    cfg.data.seq_len, cfg.data.batch_size = 64, 2
    cfg.optim.lr, cfg.optim.warmup_steps = 3e-3, 2
    cfg.float8.enabled = True
    t = cfg.trainer
    t.max_steps, t.save_every, t.val_every = steps, 3, 0
    t.activation_checkpointing = True
    t.sample_tokens, t.progress_bar = 0, False
    return cfg


def loader():
    return SyntheticPackedLoader(2, 64, vocab_size=512, eos_id=3, mean_doc=20, seed=1, learnable=True)


@pytest.fixture
def emulated(monkeypatch):
    """The trainer's converters with torchao's emulation, so that a CPU runs the float8 path."""
    from nemo_lite.training import trainer as trainer_module

    def build(cfg, **kwargs):
        return [Float8Converter(cfg.float8, emulate=True)] if cfg.float8.enabled else []

    monkeypatch.setattr(trainer_module, "build_converters", build)


@needs_torchao
def test_the_trainer_converts_before_activation_checkpointing_and_compile(tmp_path, emulated, monkeypatch, capsys):
    from torchao.float8.float8_linear import Float8Linear

    from nemo_lite.training import trainer as trainer_module
    from nemo_lite.training.trainer import Trainer

    seen = []
    wrap = trainer_module.apply_activation_checkpointing

    def checkpointing(blocks, *args):
        seen.append(("checkpointing", sum(isinstance(m, Float8Linear) for b in blocks for m in b.modules())))
        wrap(blocks, *args)

    monkeypatch.setattr(trainer_module, "apply_activation_checkpointing", checkpointing)

    def compile(module, *args, **kwargs):  # which float8 linears each compiled unit holds by then
        seen.append(("compile", type(module).__name__, sum(isinstance(m, Float8Linear) for m in module.modules())))

    monkeypatch.setattr(nn.Module, "compile", compile)
    cfg = recipe(tmp_path, "order")
    cfg.trainer.compile = True
    Trainer(cfg, train_loader=loader()).setup()
    assert seen[0] == ("checkpointing", 4)
    compiled_blocks = [count for step, kind, *count in seen if step == "compile" and kind == "DecoderBlock"]
    assert compiled_blocks == [[2], [2]]
    assert "[nemo_lite] float8 (tensorwise, emulated): converted mlp.gate_proj" in capsys.readouterr().err


@needs_torchao
def test_float8_checkpoints_and_export_stay_plain_and_resume_is_exact(tmp_path, emulated):
    from nemo_lite.training.trainer import Trainer

    plain_cfg = recipe(tmp_path, "plain")
    plain_cfg.float8.enabled = False
    plain = Trainer(plain_cfg, train_loader=loader()).fit()
    straight = Trainer(recipe(tmp_path, "straight"), train_loader=loader()).fit()
    assert straight.losses != plain.losses  # the float8 path did run
    assert straight.losses[-1] < straight.losses[0]

    for ours, theirs in ((straight.last_checkpoint, plain.last_checkpoint), (straight.hf_dir, plain.hf_dir)):
        name = "model.safetensors"
        with safe_open(str(ours / name), "pt") as a, safe_open(str(theirs / name), "pt") as b:
            keys = sorted(a.keys())
            assert keys == sorted(b.keys())
            for key in keys:
                assert a.get_tensor(key).dtype == b.get_tensor(key).dtype == torch.float32, key
            assert a.metadata() == b.metadata()
    exported = LlamaForCausalLM.from_pretrained(straight.hf_dir)
    assert all(type(m) is nn.Linear for m in exported.modules() if isinstance(m, nn.Linear))

    cfg = recipe(tmp_path, "resumed")
    first = Trainer(cfg, train_loader=loader())
    after_each_step(first, lambda tr, metrics: tr.step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    stopped = first.fit()
    assert stopped.status == "interrupted" and stopped.steps == 3
    cfg.trainer.resume = "true"
    resumed = Trainer(cfg, train_loader=loader())
    assert stopped.losses + resumed.fit().losses == straight.losses  # exact, not approximate

    cfg.float8.enabled, cfg.trainer.max_steps = False, 8  # the same checkpoint goes on in high precision
    plain_again = Trainer(cfg, train_loader=loader())
    assert plain_again.fit().steps == 8 and not plain_again.converters
