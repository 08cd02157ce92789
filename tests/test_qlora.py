"""QLoRA (peft=lora with peft.quantize_base=nf4): the decoder blocks' frozen linears in torchao's NF4. The quantized
model computes exactly what transformers' model computes with the dequantized weights, and within NF4's rounding of
the float32 model; the adapters train; the merged export is the dequantized base plus PEFT's merge of the exported
adapter; checkpoints resume exactly (the base is quantized again from the checkpoint on disk); the memory check
counts the 4-bit base; what cannot run is refused in one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("torchao")

from model_utils import random_ids  # noqa: E402
from recipe_utils import tiny_config  # noqa: E402
from test_lora import write_base as write_llama  # noqa: E402

from nemo_lite.training.config import ConfigError  # noqa: E402
from nemo_lite.training.converters import nf4  # noqa: E402
from nemo_lite.training.trainer import Trainer  # noqa: E402

HF_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_base(path: Path) -> Path:
    """A random transformers Llama whose q, o and MLP weights are whole NF4 groups (64 x 256 values) and whose
    k and v (GQA: 64 x 128) are not, so both kinds of frozen linear are exercised."""
    return write_llama(path, hidden_size=128, intermediate_size=256)


def qlora_config(run_dir: Path, base: Path, *, steps: int = 6):
    cfg = tiny_config(run_dir, backend="sdpa", steps=steps)
    cfg.model.pretrained_path = str(base)
    cfg.data.tokenizer = "model"
    cfg.peft.method, cfg.peft.r, cfg.peft.alpha, cfg.peft.quantize_base = "lora", 4, 8.0, "nf4"
    cfg.trainer.save_every, cfg.trainer.val_every, cfg.trainer.sample_tokens = 3, 0, 0
    return cfg


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return write_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base):
    trainer = Trainer(qlora_config(tmp_path_factory.mktemp("run"), base))
    return trainer, trainer.fit()


def hf_linear_weights(model) -> dict[str, torch.Tensor]:
    """transformers' block linear weights by parameter name."""
    return {n: p for n, p in model.named_parameters() if n.endswith(".weight") and n.split(".")[-2] in HF_LINEARS}


def nf4_reference(base: Path):
    """transformers' model of ``base`` with each block linear replaced by its NF4 quantization dequantized (torchao
    called directly, float32); the linears that are no whole NF4 groups keep their weights."""
    import transformers
    from torchao.quantization import to_nf4

    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        for weight in hf_linear_weights(model).values():
            if weight.numel() % (64 * 256) == 0:
                weight.copy_(to_nf4(weight.detach().clone(), 64, 256).get_original_weight())
    return model


def test_the_nf4_base_computes_with_its_dequantized_weights_within_nf4_error(base):
    import transformers

    from nemo_lite.components.models import family_of_checkpoint
    from nemo_lite.training.converters.lora import LoraConverter, PeftSection

    family = family_of_checkpoint(base)
    model = family.load_pretrained(base)
    converter = LoraConverter(PeftSection(method="lora", r=4, alpha=8.0, quantize_base="nf4"), base_dir=base)
    converter.convert(model, family)
    weights = dict(model.named_parameters())
    quantized = [name for name, p in weights.items() if nf4.is_nf4(p)]
    assert len(quantized) == 2 * 5  # q, o, gate, up, down in each layer; k and v are not whole groups
    assert all(not weights[name].requires_grad for name in quantized)
    assert "4 kept in float32" in converter.description

    ids = random_ids(2, 48, 8192, seed=1)
    reference, plain = nf4_reference(base), transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        ours = model.eval()(ids)
        exact = reference(input_ids=ids).logits
        full = plain(input_ids=ids).logits
    assert (ours - exact).abs().max().item() <= 1e-5 * exact.abs().max().item()
    # NF4 keeps about 3 significant bits per weight: the logits move, but by a fraction of their size.
    moved = ((ours - full).norm() / full.norm()).item()
    assert 1e-3 < moved < 0.2
    for name, weight in hf_linear_weights(plain).items():
        ours_weight = reference.get_parameter(name)
        if weight.numel() % (64 * 256) == 0:
            # Each value within half the widest gap between NF4's levels (0.14) of its block's maximum, plus the
            # int8 rounding of that block's scale.
            error = (weight - ours_weight).abs().view(-1, 64).max(1).values / weight.abs().view(-1, 64).max(1).values
            assert error.max().item() < 0.2

    torch.manual_seed(1)  # nonzero B: the adapters add to the quantized base as to a plain one
    with torch.no_grad():
        for name, param in weights.items():
            if ".lora_B." in name:
                param.normal_(0.0, 0.05)
    with torch.no_grad():
        delta = model(ids) - ours
    assert delta.abs().max().item() > 1e-3


def test_the_adapters_learn_on_the_quantized_base(base, tmp_path):
    from nemo_lite.testing.data import SyntheticPackedLoader

    cfg = qlora_config(tmp_path, base, steps=8)
    cfg.optim.lr, cfg.trainer.export_hf = 1e-2, False
    # Documents counting up through 64 of the 8192 ids: the random base spreads its guesses over all of them.
    loader = SyntheticPackedLoader(4, 64, vocab_size=64, eos_id=2, mean_doc=32, learnable=True)
    losses = Trainer(cfg, train_loader=loader).fit().losses
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.25


def test_only_the_adapters_train_and_the_base_stays_quantized(trained):
    trainer, result = trained
    assert result.status == "completed" and len(result.losses) == 6
    params = dict(trainer.raw_model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable == {name for name in params if ".lora_A." in name or ".lora_B." in name}
    assert sum(nf4.is_nf4(p) for p in params.values()) == 10


def test_the_merged_export_is_the_dequantized_base_plus_peft_merge(trained, base):
    """run_dir/hf against transformers' model with the NF4 round trip of its weights and the exported adapter merged
    by PEFT: every tensor within 1e-5 relative (float32)."""
    import peft
    import transformers

    trainer, result = trained
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir)
    reference = peft.PeftModel.from_pretrained(nf4_reference(base), trainer.run_dir / "adapter").merge_and_unload()
    ours, theirs = merged.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert (ours[name] - tensor).abs().max().item() <= 1e-5 * tensor.abs().max().item(), name
    plain = transformers.AutoModelForCausalLM.from_pretrained(base).state_dict()
    changed = [n for n in hf_linear_weights(merged) if not torch.equal(ours[n], plain[n])]
    assert len(changed) == 2 * 7  # every adapted weight moved (quantized or not)
    ids = random_ids(2, 40, 8192, seed=4)
    with torch.no_grad():
        diff = (trainer.raw_model.eval()(ids) - merged.eval()(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4  # the export computes what the trained model computes


def test_a_checkpoint_holds_the_adapters_and_resumes_exactly(trained, base, tmp_path):
    trainer, result = trained
    ckpt = trainer.run_dir / "checkpoints" / "step_000003"
    state = torch.load(ckpt / "train_state.pt", weights_only=True)
    assert state["peft"]["quantize_base"] == "nf4 from float32"
    cfg = qlora_config(tmp_path / "resumed", base)
    cfg.trainer.resume, cfg.trainer.export_hf = str(ckpt), False
    assert Trainer(cfg).fit().losses == result.losses[3:]  # bit-equal: the base is quantized the same way again

    cfg = qlora_config(tmp_path / "unquantized", base)
    cfg.trainer.resume, cfg.peft.quantize_base = str(ckpt), "none"
    with pytest.raises(ConfigError, match=r"quantized as 'nf4 from float32' and this run's is 'none'"):
        Trainer(cfg).setup()


def test_the_memory_check_counts_the_4bit_base(trained, base):
    """The floor the memory check uses, against the bytes the converted model really holds: its parameters'
    storage (torchao's inner tensors for the NF4 weights) and the adapters' gradients and AdamW moments."""
    from nemo_lite.components.models.hf import read_config
    from nemo_lite.training.converters import training_bytes

    trainer, _ = trained
    held = 0
    for param in trainer.raw_model.parameters():
        if nf4.is_nf4(param):
            inner = (param.quantized_data, param.quantized_scalers, param.quantization_factor, param.scaler_mean)
            held += sum(t.numel() * t.element_size() for t in inner)
        else:
            held += param.numel() * param.element_size() * (4 if param.requires_grad else 1)
    floor = training_bytes(trainer.cfg, read_config(base))  # on the CPU: no autocast, float32
    assert 0.97 * held <= floor <= held
    cfg = qlora_config(trainer.run_dir, base)
    cfg.peft.quantize_base = "none"
    assert training_bytes(cfg, read_config(base)) > floor  # the float32 base is counted in full


def test_the_8b_shape_fits_the_memory_check_in_14_gib():
    """Llama-3.1-8B with bf16 autocast and r=16 on every linear: the 4-bit base's training state is a floor well
    under 14 GiB; the same shape unquantized needs more than its bf16 weights."""
    from nemo_lite.components.models import get_preset
    from nemo_lite.training.config import RecipeConfig
    from nemo_lite.training.converters import training_bytes

    cfg = RecipeConfig()
    cfg.peft.method, cfg.peft.r, cfg.peft.quantize_base = "lora", 16, "nf4"
    config = get_preset("llama-3.1-8b")
    quantized = training_bytes(cfg, config, autocast_dtype=torch.bfloat16)
    assert 5 * 2**30 < quantized < 8 * 2**30
    cfg.peft.quantize_base = "none"
    assert training_bytes(cfg, config, autocast_dtype=torch.bfloat16) > 15 * 2**30


@pytest.mark.parametrize(
    "change, match",
    [
        ({"peft.quantize_base": "int4"}, r"peft.quantize_base='int4' is not valid; choose one of: none, nf4"),
        ({"peft.method": "none"}, r"peft.quantize_base=nf4 quantizes the frozen base under LoRA adapters"),
        ({"float8.enabled": True}, r"peft.quantize_base=nf4 with float8.enabled=true"),
        ({"peft.target_parameters": ["gate_up_proj"]}, r"peft.quantize_base=nf4 with peft.target_parameters"),
    ],
)
def test_what_cannot_compose_is_refused_before_any_work(base, tmp_path, change, match):
    cfg = qlora_config(tmp_path, base)
    for dotted, value in change.items():
        section, key = dotted.split(".")
        setattr(getattr(cfg, section), key, value)
    with pytest.raises(ConfigError, match=match):
        Trainer(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_without_torchao_it_is_refused_with_the_install_line(base, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match=r"peft.quantize_base=nf4 needs torchao, which is not installed: pip install"):
        Trainer(qlora_config(tmp_path, base))


def test_compiled_blocks_trace_the_nf4_linears_without_graph_breaks(trained, base, tmp_path, monkeypatch):
    """trainer.compile=true over NF4 weights under PEFT's layers, with activation checkpointing, fullgraph (any graph
    break fails), aot_eager (as tests/test_lora.py: dynamo and AOT autograd without inductor's C++ build)."""
    from nemo_lite.training import loss

    _, result = trained
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self: real_compile(self, backend="aot_eager", fullgraph=True)
    )
    monkeypatch.setattr(
        loss, "_compiled_head_loss", torch.compile(loss.head_cross_entropy_sum, backend="aot_eager", fullgraph=True)
    )
    cfg = qlora_config(tmp_path, base, steps=3)
    cfg.trainer.compile, cfg.trainer.activation_checkpointing, cfg.trainer.export_hf = True, True, False
    trainer = Trainer(cfg)
    losses = trainer.fit().losses
    assert trainer.model.layers[0]._compiled_call_impl is not None
    assert max(abs(a - b) for a, b in zip(losses, result.losses[:3], strict=True)) <= 1e-4
