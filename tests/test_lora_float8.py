"""LoRA (peft=lora) and float8 (float8.enabled=true) together, on CPU with torchao's emulation: PEFT's LoRA layers
wrap the base linears and float8 converts the base linears its rule picks, never the adapters; only the adapters
train, and the run learns; checkpoints hold the adapters and resume exactly; the export is a PEFT adapter
directory and a merged model of plain float32 tensors, which PEFT and transformers load with the same logits."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None, reason="torchao is not installed (pip install 'nemo_lite[float8]')"
)

from nemo_lite.components.attention import AttentionConfig  # noqa: E402
from nemo_lite.components.models import family_of_preset  # noqa: E402
from nemo_lite.components.models.hf import to_hf_key  # noqa: E402
from nemo_lite.testing.data import SyntheticPackedLoader  # noqa: E402
from nemo_lite.testing.hooks import after_each_step  # noqa: E402
from nemo_lite.testing.lora import read_adapter_dir  # noqa: E402
from nemo_lite.training import trainer as trainer_module  # noqa: E402
from nemo_lite.training.config import RecipeConfig  # noqa: E402
from nemo_lite.training.converters import build_converters  # noqa: E402
from nemo_lite.training.converters.float8 import Float8Converter, float8_keep_reason  # noqa: E402
from nemo_lite.training.converters.lora import hf_adapter_key  # noqa: E402
from nemo_lite.training.trainer import Trainer  # noqa: E402

# The MLP up-projections pass the tensorwise rule (1040 > 1024 outputs); every other linear stays.
SMALL = {"intermediate_size": 1040, "vocab_size": 512, "eos_token_id": 3}
LINEARS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
FLOAT8 = {"gate_proj", "up_proj"}
R, ALPHA = 16, 32.0  # r=16: lora_B of up_proj (1040 x 16) is large enough that the size rule alone would convert it


@pytest.fixture(scope="module", autouse=True)
def emulated():
    """The trainer's own converters, with torchao's emulation so that float8 runs on a CPU."""

    def build(cfg, **kwargs):
        converters = build_converters(cfg, **kwargs)
        for converter in converters:
            if isinstance(converter, Float8Converter):
                converter.emulate = True
        return converters

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_module, "build_converters", build)
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    family = family_of_preset("tiny")
    model = family.build(family.preset("tiny", **SMALL))
    model.init_weights(seed=0)
    return model.save_pretrained(tmp_path_factory.mktemp("base") / "base")


def config(run_dir: Path, base: Path, *, steps: int = 6, float8: bool = True) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.run_dir = str(run_dir)
    cfg.model.pretrained_path = str(base)
    cfg.model.vocab_from_tokenizer = False
    cfg.attention.backend = "sdpa"
    cfg.data.seq_len, cfg.data.batch_size = 64, 2
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 2
    cfg.peft.method, cfg.peft.r, cfg.peft.alpha = "lora", R, ALPHA
    cfg.float8.enabled = float8
    t = cfg.trainer
    t.max_steps, t.save_every, t.val_every = steps, 3, 0
    t.sample_tokens, t.progress_bar = 0, False
    return cfg


def loader():
    return SyntheticPackedLoader(2, 64, vocab_size=512, eos_id=3, mean_doc=20, seed=1, learnable=True)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {key: f.get_tensor(key) for key in sorted(f.keys())}, f.metadata()


@pytest.fixture(scope="module")
def straight(tmp_path_factory, base):
    trainer = Trainer(config(tmp_path_factory.mktemp("straight") / "run", base), train_loader=loader())
    return trainer, trainer.fit()


def test_float8_converts_the_base_linears_under_the_lora_layers_and_never_the_adapters(straight, base):
    from peft.tuners.lora import LoraLayer
    from torchao.float8.float8_linear import Float8Linear

    trainer, result = straight
    model = trainer.raw_model
    assert float8_keep_reason(1040, R, "tensorwise") is None  # lora_B of up_proj would convert by its size
    for i, block in enumerate(model.layers):
        for part, leaves in LINEARS.items():
            for leaf in leaves:
                layer = getattr(getattr(block, part), leaf)
                assert isinstance(layer, LoraLayer), (i, leaf)
                assert type(layer.get_base_layer()) is (Float8Linear if leaf in FLOAT8 else nn.Linear), (i, leaf)
                for adapter in (layer.lora_A["default"], layer.lora_B["default"]):
                    assert type(adapter) is nn.Linear and adapter.weight.dtype == torch.float32, (i, leaf)
    float8 = sorted(name for name, m in model.named_modules() if isinstance(m, Float8Linear))
    assert float8 == [f"layers.{i}.mlp.{leaf}.base_layer" for i in (0, 1) for leaf in ("gate_proj", "up_proj")]

    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert trainable == {name for name in params if ".lora_A." in name or ".lora_B." in name}
    assert len(trainable) == 2 * 7 * 2  # A and B on the 7 linears of 2 blocks
    # The frozen weights, float8 layers' included, are still the base's float32 values after training.
    on_disk, _ = read(base / "model.safetensors")
    frozen = {name: p for name, p in model.state_dict().items() if name not in trainable}
    assert frozen and all(p.dtype == torch.float32 for p in frozen.values())
    assert all(torch.equal(p, on_disk[to_hf_key(name.replace(".base_layer", ""))]) for name, p in frozen.items())

    lora, float8_line = (c.description for c in trainer.converters)
    assert lora.startswith(f"LoRA (PEFT): r={R}, alpha={ALPHA:g}, dropout=0, on down_proj, gate_proj, k_proj")
    assert float8_line.startswith(
        "float8 (tensorwise, emulated): converted mlp.gate_proj.base_layer (2/2 blocks), "
        "mlp.up_proj.base_layer (2/2 blocks); kept in high precision: "
    )
    assert float8_line.endswith(", 28 adapter linears, the output projection")


def test_with_bf16_frozen_linears_under_autocast_the_adapters_still_get_float32_gradients():
    """On a GPU the run autocasts to bf16 and LoRA stores the frozen linears in bf16 before float8 converts
    them; a CPU reaches that combination only outside the trainer (which autocasts on CUDA alone)."""
    from torchao.float8.float8_linear import Float8Linear

    from nemo_lite.training.config import Float8Section, PeftSection
    from nemo_lite.training.converters.lora import LoraConverter

    family = family_of_preset("tiny")
    model = family.build(family.preset("tiny", **SMALL), attention=AttentionConfig(backend="sdpa"))
    model.init_weights(seed=0)
    LoraConverter(PeftSection(method="lora", r=R, alpha=ALPHA), frozen_dtype=torch.bfloat16).convert(model, family)
    Float8Converter(Float8Section(enabled=True), emulate=True).convert(model, family)
    float8 = [m for m in model.modules() if isinstance(m, Float8Linear)]
    assert len(float8) == 4 and all(m.weight.dtype == torch.bfloat16 for m in float8)
    ids = torch.randint(4, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # B starts at 0, so only B has a gradient after one backward
            assert p.dtype == p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0, name
        elif not p.requires_grad:
            assert p.grad is None, name


def test_the_run_learns_checkpoints_hold_the_adapters_and_resume_is_exact(straight, base, tmp_path):
    trainer, result = straight
    assert result.status == "completed" and len(result.losses) == 6
    assert result.losses[-1] < result.losses[0] - 0.05  # learnable data: the adapters learn through float8
    lora_alone = Trainer(config(tmp_path / "lora", base, float8=False), train_loader=loader()).fit()
    assert lora_alone.losses != result.losses  # the float8 path did run

    trainable = {name for name, p in trainer.raw_model.named_parameters() if p.requires_grad}
    for step in (3, 6):
        ckpt = trainer.run_dir / "checkpoints" / f"step_{step:06d}"
        tensors, _ = read(ckpt / "model.safetensors")
        assert set(tensors) == trainable  # the adapters only: the base comes from model.pretrained_path
        assert all(t.dtype == torch.float32 for t in tensors.values())
        state = torch.load(ckpt / "train_state.pt", weights_only=True)
        assert state["peft"]["r"] == R and state["peft"]["base"]["path"] == str(base.resolve())
        assert {"optimizer", "data"} <= set(state)

    cfg = config(tmp_path / "resumed", base)
    first = Trainer(cfg, train_loader=loader())
    after_each_step(first, lambda tr, metrics: tr.step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    stopped = first.fit()
    assert stopped.status == "interrupted" and stopped.steps == 3
    cfg.trainer.resume = "true"
    assert stopped.losses + Trainer(cfg, train_loader=loader()).fit().losses == result.losses  # exact


def test_the_export_is_a_peft_adapter_and_a_plain_float32_merged_model(straight, base):
    import peft
    import transformers

    trainer, result = straight
    adapters = {name: p.detach() for name, p in trainer.raw_model.named_parameters() if p.requires_grad}
    adapter_config, keys = read_adapter_dir(trainer.run_dir / "adapter")
    assert keys == sorted(hf_adapter_key(name) for name in adapters)
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == R
    assert sorted(adapter_config["target_modules"]) == sorted(sum(LINEARS.values(), []))
    saved_adapters, _ = read(trainer.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in saved_adapters.values())

    assert result.hf_dir == trainer.run_dir / "hf"
    merged, metadata = read(result.hf_dir / "model.safetensors")
    original, base_metadata = read(base / "model.safetensors")
    assert sorted(merged) == sorted(original) and metadata == base_metadata  # no float8 or torchao state
    assert all(t.dtype == torch.float32 for t in merged.values())
    # base + alpha/r * B @ A, also on the linears that trained in float8
    for i in (0, 1):
        for part, leaf in (("mlp", "up_proj"), ("self_attn", "q_proj")):
            key = f"model.layers.{i}.{part}.{leaf}"
            a = saved_adapters[f"base_model.model.{key}.lora_A.weight"]
            b = saved_adapters[f"base_model.model.{key}.lora_B.weight"]
            delta = merged[f"{key}.weight"] - original[f"{key}.weight"]
            assert delta.abs().max() > 1e-4
            torch.testing.assert_close(delta, ALPHA / R * b @ a, atol=1e-6, rtol=1e-4)

    ids = torch.randint(4, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), trainer.run_dir / "adapter"
    ).eval()
    alone = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir).eval()
    assert all(type(m) is nn.Linear for m in alone.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        assert (with_adapter(input_ids=ids).logits - alone(input_ids=ids).logits).abs().max().item() <= 1e-4


def test_dora_trains_over_float8_base_linears_and_exports_peft_merge(base, tmp_path):
    """DoRA (peft.use_dora=true) with float8: the base matmul of the converted linears runs in float8 and the
    weight norm reads their float32 weight; the losses stay near DoRA's without float8 and hf/ equals PEFT's
    merge_and_unload of the exported adapter."""
    import peft
    import transformers
    from torchao.float8.float8_linear import Float8Linear

    runs = {}
    for float8 in (False, True):
        cfg = config(tmp_path / f"float8-{float8}", base, steps=3, float8=float8)
        cfg.peft.use_dora, cfg.trainer.save_every = True, 0
        trainer = Trainer(cfg, train_loader=loader())
        runs[float8] = trainer, trainer.fit()
    trainer, result = runs[True]
    assert any(isinstance(m, Float8Linear) for m in trainer.raw_model.modules())
    assert max(abs(a - b) for a, b in zip(result.losses, runs[False][1].losses, strict=True)) <= 1e-2
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), trainer.run_dir / "adapter"
    ).merge_and_unload()
    expected = reference.state_dict()
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir).state_dict()
    assert sorted(merged) == sorted(expected)
    assert max((merged[k] - expected[k]).abs().max().item() for k in expected) <= 1e-5
