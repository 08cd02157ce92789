"""The optimizer table (nemo_lite.training.optimizers): ``optim.name`` picks an entry that checks its own
options; ``adamw`` is torch's AdamW; ``muon`` is torch's Muon on the decoder blocks' matrices (the family
says which modules are the blocks) and AdamW on the rest, its update a Newton–Schulz orthogonalization
checked against a float64 reference, its step size matched to AdamW's update RMS. ``optim=muon`` trains the
recipe on CPU with a falling loss, resumes exactly, and runs under the fast step with its AdamW parts off."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recipe_utils import tiny_config
from test_step import OPTIM, batches, run_step, twins
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import family_of_preset
from nemo_lite.training.config import ConfigError, OptimSection, RecipeConfig, validate
from nemo_lite.training.muon import MuonWithAdamW, ShardedMuon
from nemo_lite.training.optimizers import (
    AdamW,
    OptimizerEntry,
    build_optimizer,
    get_optimizer,
    param_groups,
    register_optimizer,
    unregister_optimizer,
)
from nemo_lite.training.step import PlainStep
from nemo_lite.training.step_choice import build_step

MUON = OptimSection(name="muon", lr=1e-2, weight_decay=0.1)
# torch.optim.Muon's quintic coefficients (Keller Jordan's), restated here as the reference's own constants.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def qwen2_model() -> nn.Module:
    """A two-block Qwen2 (q/k/v biases, untied head) small enough for CPU."""
    family = family_of_preset("qwen2.5-0.5b")
    config = family.preset(
        "qwen2.5-0.5b",
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    model = family.build(config, attention=AttentionConfig(backend="eager"))
    model.init_weights(seed=0)
    return model


# ---- the table ------------------------------------------------------------------------------------------


def test_the_name_is_checked_against_the_table_and_each_entry_checks_its_options():
    with pytest.raises(ConfigError, match=r"^optim.name='sgd' is not valid; choose one of: adamw, muon$"):
        get_optimizer("sgd")
    cfg = RecipeConfig()
    cfg.optim.name = "sgd"
    with pytest.raises(ConfigError, match=r"^optim.name='sgd' is not valid; choose one of: adamw, muon$"):
        validate(cfg)
    cases = [
        ("adamw", {"momentum": 0.9}, r"optim.options.momentum is not an option of optim=adamw; its options: none$"),
        ("muon", {"beta": 0.9}, r"optim.options.beta is not an option of optim=muon; its options: momentum, "),
        ("muon", {"momentum": 1.0}, r"optim.options.momentum=1.0 must be in \[0, 1\)$"),
        ("muon", {"nesterov": "yes"}, r"optim.options.nesterov='yes' must be true or false$"),
        ("muon", {"ns_steps": 0}, r"optim.options.ns_steps=0 must be an integer in \[1, 99\]$"),
    ]
    for name, options, want in cases:
        cfg.optim.name, cfg.optim.options = name, options
        with pytest.raises(ConfigError, match=want):
            validate(cfg)
    cfg.optim.name, cfg.optim.options = "muon", {"momentum": 0.9, "nesterov": False, "ns_steps": 3}
    validate(cfg)


def test_registering_an_optimizer_is_one_entry():
    @register_optimizer("sgd_for_test")
    class SGDEntry(OptimizerEntry):
        option_defaults = {"momentum": 0.0}
        summary = "torch SGD"

        @classmethod
        def build(cls, model, optim, blocks):
            return torch.optim.SGD(param_groups(model, optim.weight_decay), lr=optim.lr, **cls.options(optim))

    try:
        model = twins()[0]
        step = PlainStep(model, OptimSection(name="sgd_for_test", lr=0.1, options={"momentum": 0.5}))
        assert type(step.optimizer) is torch.optim.SGD and step.optimizer.param_groups[0]["momentum"] == 0.5
        assert step.description.startswith("plain step: torch SGD,")
        before = [p.detach().clone() for p in model.parameters()]
        run_step(step, model, batches(model, 1)[0], clip=1.0)
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        with pytest.raises(ValueError, match="optimizer 'sgd_for_test' is already registered by"):
            register_optimizer("sgd_for_test")(type("Other", (OptimizerEntry,), {}))
    finally:
        unregister_optimizer("sgd_for_test")


def test_adamw_is_torchs_adamw_on_the_usual_groups():
    model = twins()[0]
    opt = build_optimizer(model, OPTIM, blocks=list(model.layers))
    assert type(opt) is AdamW and get_optimizer("adamw").adamw_compatible and not get_optimizer("muon").adamw_compatible
    want = param_groups(model, OPTIM.weight_decay)
    assert [g["params"] for g in opt.param_groups] == [g["params"] for g in want]
    assert [g["weight_decay"] for g in opt.param_groups] == [OPTIM.weight_decay, 0.0]


# ---- which parameters go where ----------------------------------------------------------------------------


def test_muon_takes_the_blocks_matrices_and_adamw_embeddings_norms_biases_and_the_head():
    model = qwen2_model()
    family = family_of_preset("qwen2.5-0.5b")
    opt = build_optimizer(model, MUON, family.blocks(model))
    assert isinstance(opt, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw_decay, adamw_plain = ({names[id(p)] for p in g["params"]} for g in opt.adamw.param_groups)
    matrices = {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert muon == matrices and len(matrices) == 2 * 7
    assert adamw_decay == {"embed_tokens.weight", "lm_head.weight"}
    biases = {n for n in names.values() if n.endswith(".bias")}
    assert biases and biases | {"norm.weight"} <= adamw_plain
    assert muon | adamw_decay | adamw_plain == set(names.values()) and not muon & (adamw_decay | adamw_plain)
    assert [g["weight_decay"] for g in opt.adamw.param_groups] == [MUON.weight_decay, 0.0]
    assert opt.param_groups == [*opt.muon.param_groups, *opt.adamw.param_groups]

    # The family decides what the blocks are, not the parameter names: one block given, one block's matrices.
    only_first = build_optimizer(model, MUON, [model.layers[0]])
    muon = {names[id(p)] for g in only_first.muon.param_groups for p in g["params"]}
    assert muon == {n for n in matrices if n.startswith("layers.0.")}
    with pytest.raises(ConfigError, match="optim=muon found no trainable 2-D matrix in the model's decoder"):
        build_optimizer(model, MUON, [])


# ---- the update -----------------------------------------------------------------------------------------


def newton_schulz_float64(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton–Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T, on the wide orientation of
    ``update`` scaled to Frobenius norm 1, in float64."""
    a, b, c = NS_COEFFICIENTS
    x = update.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(x.norm().item(), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(8, 24), (24, 8)], ids=["wide", "tall"])
def test_muons_update_is_the_newton_schulz_iteration_scaled_to_adamws_rms(shape):
    """Two steps with Nesterov momentum: the weight moves by -lr*wd*w (decoupled decay) and by the float64
    reference's orthogonalization of the momentum-updated gradient, times lr * 0.2 * sqrt(max(fan_out,
    fan_in)). torch iterates in bf16, whose rounding over five iterations leaves about 2% (relative, in the
    Frobenius norm) between the two; a wrong step size, orientation or iteration is far outside 4%."""
    gen = torch.Generator().manual_seed(0)
    weight = nn.Parameter(torch.randn(shape, generator=gen))
    lr, wd, momentum = 0.02, 0.1, 0.95
    opt = ShardedMuon([weight], lr=lr, weight_decay=wd, momentum=momentum, adjust_lr_fn="match_rms_adamw")
    step_size = lr * 0.2 * math.sqrt(max(shape))
    buf = torch.zeros(shape, dtype=torch.float64)
    for _ in range(2):
        grad = torch.randn(shape, generator=gen)
        before = weight.detach().double().clone()
        weight.grad = grad.clone()
        opt.step()
        buf = momentum * buf + (1 - momentum) * grad.double()
        want = newton_schulz_float64((1 - momentum) * grad.double() + momentum * buf)  # Nesterov's look-ahead
        got = (before * (1 - lr * wd) - weight.detach().double()) / step_size
        assert (got - want).norm() / want.norm() < 0.04
        singular = torch.linalg.svdvals(want)  # the iteration's band around 1, not the raw gradient's spread
        assert singular.min() > 0.5 and singular.max() < 1.5
    torch.testing.assert_close(opt.state[weight]["momentum_buffer"].double(), buf, rtol=1e-6, atol=1e-7)


def test_the_sharding_aware_step_is_torchs_muon_step_bit_for_bit_on_plain_tensors():
    gen = torch.Generator().manual_seed(0)
    ours, theirs = (nn.Parameter(torch.randn(16, 12, generator=torch.Generator().manual_seed(1))) for _ in range(2))
    kw = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.9, "adjust_lr_fn": "match_rms_adamw"}
    ours_opt, theirs_opt = ShardedMuon([ours], **kw), torch.optim.Muon([theirs], **kw)
    for _ in range(3):
        grad = torch.randn(16, 12, generator=gen)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        ours_opt.step()
        theirs_opt.step()
        assert torch.equal(ours, theirs)
    assert torch.equal(ours_opt.state[ours]["momentum_buffer"], theirs_opt.state[theirs]["momentum_buffer"])


def test_the_schedule_reaches_both_parts_and_the_state_dict_round_trips(tmp_path):
    model = qwen2_model()
    blocks = family_of_preset("qwen2.5-0.5b").blocks(model)
    step = PlainStep(model, MUON, blocks=blocks)
    opt = step.optimizer
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert {g["lr"] for g in opt.muon.param_groups} == {g["lr"] for g in opt.adamw.param_groups} == {MUON.lr / 2}
    for batch in batches(model, 2):
        run_step(step, model, batch, clip=1.0)
        scheduler.step()
    torch.save(opt.state_dict(), tmp_path / "optim.pt")
    again = build_optimizer(model, MUON, blocks)
    again.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
    assert again.param_groups == opt.param_groups
    assert again.muon.param_groups == again.param_groups[: len(opt.muon.param_groups)]
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(again.state[p][key], value), key
        assert again.muon.state is again.state and again.adamw.state is again.state
    assert {"momentum_buffer"} == set(again.state[model.layers[0].mlp.up_proj.weight])
    assert {"step", "exp_avg", "exp_avg_sq"} == set(again.state[model.embed_tokens.weight])
    assert again.state[model.embed_tokens.weight]["step"].device.type == "cpu"
    with pytest.raises(ValueError, match="not a state dict of Muon with AdamW"):
        again.load_state_dict(build_optimizer(model, OPTIM, blocks).state_dict())


# ---- the fast step with another optimizer -------------------------------------------------------------------


def test_the_fast_step_with_muon_says_which_parts_are_off_and_trains_like_the_plain_step():
    """On a CPU the fast step with muon has no fast part left: it says so, builds the table's optimizer and
    updates after the host sync, giving the plain step's losses and weights bit for bit."""
    model, reference = twins()
    kw = {"distributed": False, "autocast_bf16": True, "compile": False, "loss_chunk_size": 0}
    fast = build_step(model, MUON, impl="fast", blocks=list(model.layers), device=torch.device("cpu"), **kw)
    plain = build_step(reference, MUON, impl="plain", blocks=list(reference.layers), device=torch.device("cpu"), **kw)
    assert fast.description.startswith("fast step: Muon on the decoder blocks' matrices, AdamW on the rest, updated ")
    for part in ("fused AdamW", "Triton AdamW", "bf16 weight copies"):
        assert f"{part} (needs optim=adamw)" in fast.description
    assert "Triton loss (needs a CUDA device)" in fast.description and "\n" not in fast.description
    assert isinstance(fast.optimizer, MuonWithAdamW) and not any(fast.on.values())
    losses = []
    for batch in batches(model, 3):
        got, want = run_step(fast, model, batch, clip=1.0), run_step(plain, reference, batch, clip=1.0)
        assert got == want
        losses.append(got[0])
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
    assert losses[-1] < losses[0]


def test_on_a_gpu_the_fast_step_with_muon_keeps_the_triton_loss(monkeypatch):
    """``auto`` gives the fast step on a GPU whatever the optimizer; with muon only the Triton head loss is
    on (the model stays on the CPU: building the step runs nothing on the device)."""
    pytest.importorskip("triton")
    model = twins()[0]
    kw = {"distributed": False, "autocast_bf16": True, "compile": False, "loss_chunk_size": 0}
    step = build_step(model, MUON, impl="auto", blocks=list(model.layers), device=torch.device("cuda"), **kw)
    assert step.on == {
        "fused AdamW": False,
        "Triton AdamW": False,
        "bf16 weight copies": False,
        "Triton loss": True,
        "embedding gradient as rows": False,
    }
    assert step.description.startswith(
        "fast step: Muon on the decoder blocks' matrices, AdamW on the rest, updated after the host sync, "
        "Triton loss; off: fused AdamW (needs optim=adamw); Triton AdamW (needs optim=adamw); "
    )


# ---- through the trainer ----------------------------------------------------------------------------------


def run(run_dir, steps, *, name="muon", resume=False, save_every=0):
    """The tiny recipe for ``steps`` steps; the first 6 are warmup, the same for every ``steps`` >= 6."""
    from nemo_lite.training.trainer import Trainer

    cfg = tiny_config(run_dir, "sdpa", steps=steps)
    cfg.optim.name, cfg.optim.warmup_steps = name, 6
    cfg.trainer.save_every, cfg.trainer.resume = save_every, resume
    cfg.trainer.sample_tokens, cfg.trainer.export_hf, cfg.trainer.val_every = 0, False, 0
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def compose_pretrain(overrides: list[str]) -> RecipeConfig:
    """The pretrain recipe's config as the launcher composes it (configs/pretrain.yaml + ``overrides``)."""
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_lite.training.config import register_schema

    register_schema()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="pretrain", overrides=overrides))


@pytest.mark.slow
def test_optim_muon_trains_the_default_recipe_with_a_falling_loss(tmp_path):
    from nemo_lite.training.metrics import read_metrics
    from nemo_lite.training.trainer import Trainer

    quiet = ["trainer.val_every=0", "trainer.sample_tokens=0", "trainer.export_hf=false", "trainer.progress_bar=false"]
    cfg = compose_pretrain(["optim=muon", "trainer.max_steps=30", f"run_dir={tmp_path}", *quiet])
    assert cfg.optim.name == "muon" and cfg.optim.options == {"momentum": 0.95, "nesterov": True, "ns_steps": 5}
    trainer = Trainer(cfg)
    trainer.fit()
    assert isinstance(trainer.optimizer, MuonWithAdamW)
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0


def test_a_muon_run_falls_and_its_checkpoint_round_trips_its_state_and_resumes_exactly(tmp_path):
    """The tiny recipe for 12 steps with muon: the loss falls; stopped at 6 and resumed, the last 6 losses are
    the uninterrupted run's, bit for bit (the momentum buffers and AdamW moments went through the checkpoint)."""
    from nemo_lite.training.metrics import read_metrics

    run(tmp_path / "whole", 12, save_every=6)
    want = [r["loss"] for r in read_metrics(tmp_path / "whole")]
    assert len(want) == 12 and sum(want[-3:]) / 3 < want[0] - 0.2
    run(tmp_path / "split", 6, save_every=6)
    resumed = run(tmp_path / "split", 12, resume=True, save_every=6)
    assert isinstance(resumed.optimizer, MuonWithAdamW)
    got = [r["loss"] for r in read_metrics(resumed.run_dir)]
    assert got[6:] == want[6:] and len(got) == 12
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step_000006" / "train_state.pt", weights_only=True)
    assert saved["optimizer_name"] == "muon"
    assert any("momentum_buffer" in s for s in saved["optimizer"]["state"].values())


def test_a_checkpoint_of_one_optimizer_is_refused_by_another(tmp_path):
    from nemo_lite.training.checkpoint import ResumeError

    run(tmp_path, 2, save_every=2)
    with pytest.raises(ResumeError, match=r"holds optim=muon's state but this run has optim=adamw: resume with "):
        run(tmp_path, 4, name="adamw", resume=True)
