"""GPU: the compiled training step follows the uncompiled loss curve, and backends agree, in bf16."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from nemo_lite.components.datasets.synthetic import SyntheticPackedLoader
from nemo_lite.training.config import RecipeConfig
from nemo_lite.training.trainer import Trainer

pytestmark = pytest.mark.gpu
STEPS = 20


def recipe(tmp_path, backend: str, compile: bool, chunk: int = 0, weight_copies: str = "auto") -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.run_dir = str(tmp_path / f"{backend}-{compile}-{chunk}-{weight_copies}")
    cfg.model.preset = "tiny"
    cfg.model.vocab_from_tokenizer = False
    cfg.model.overrides = {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 8192,
    }
    cfg.attention.backend = backend
    cfg.data.seq_len, cfg.data.batch_size = 1024, 2
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 2
    t = cfg.trainer
    t.max_steps, t.compile, t.loss_chunk_size = STEPS, compile, chunk
    t.val_every = t.save_every = t.sample_tokens = 0
    t.export_hf = t.progress_bar = False
    cfg.optim.weight_copies = weight_copies
    return cfg


def loader():
    return SyntheticPackedLoader(
        2, 1024, vocab_size=8192, eos_id=3, mean_doc=200, seed=1, pin_memory=True, learnable=True
    )


def curve(tmp_path, backend: str, compile: bool, chunk: int = 0, weight_copies: str = "auto") -> list[float]:
    cfg = recipe(tmp_path, backend, compile, chunk, weight_copies)
    return Trainer(cfg, train_loader=loader()).fit().losses


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uncompiled flex curve, and bf16's own noise: the same step with only the loss's reduction
    order changed (chunked), which any other numerically-equivalent path is compared against."""
    tmp = tmp_path_factory.mktemp("ref")
    base = curve(tmp, "flex", compile=False)
    reordered = curve(tmp, "flex", compile=False, chunk=512)
    noise = max(abs(a - b) for a, b in zip(base, reordered, strict=True))
    print(f"\nflex eager: {[round(x, 4) for x in base]}\nbf16 noise (reordered loss): {noise:.4f}")
    return base, noise


def assert_same_curve(name, other, reference):
    base, noise = reference
    diffs = [abs(a - b) for a, b in zip(base, other, strict=True)]
    print(f"{name}: first {diffs[0]:.4f}, max {max(diffs):.4f} (noise {noise:.4f})")
    assert diffs[0] <= 1e-2  # before any update: forward numerics only
    assert max(diffs) <= max(3 * noise, 0.05)


def test_compiled_step_matches_uncompiled_within_bf16_noise(tmp_path, reference):
    base, _ = reference
    assert base[-1] < base[0] - 0.3  # the counting documents are learnable
    assert_same_curve("flex compiled", curve(tmp_path, "flex", compile=True), reference)
    assert_same_curve("flex compiled, chunked loss", curve(tmp_path, "flex", compile=True, chunk=512), reference)


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "eager"])
def test_backends_follow_the_flex_curve(tmp_path, backend, reference):
    assert_same_curve(backend, curve(tmp_path, backend, compile=False), reference)


def test_weight_copies_follow_the_plain_curve(tmp_path, reference):
    """bf16 weight copies written by the update kernel give what autocast's casts give: the same
    curve, compiled, and copies equal to the float32 weights rounded."""
    _, noise = reference
    trainer = Trainer(recipe(tmp_path, "flex", compile=True, weight_copies="true"), train_loader=loader())
    copied = trainer.fit().losses
    assert trainer.weight_copies
    for module in trainer.raw_model.layers.modules():
        if getattr(module, "weight_copy", None) is not None:
            assert torch.equal(module.weight_copy, module.weight.to(torch.bfloat16))
    plain = curve(tmp_path, "flex", compile=True, weight_copies="false")
    diffs = [abs(a - b) for a, b in zip(plain, copied, strict=True)]
    print(f"weight copies against autocast's casts: max {max(diffs):.2e} (noise {noise:.4f})")
    assert max(diffs) <= noise


def test_the_lookup_gradient_as_rows_follows_the_dense_curve(tmp_path, reference):
    """The embedding's lookup gradient kept as rows (the default with copies) trains as the dense one."""
    _, noise = reference
    trainer = Trainer(recipe(tmp_path, "flex", compile=True), train_loader=loader())
    rows = trainer.fit().losses
    assert trainer.lookup_gradient == "rows" and trainer.raw_model.embed_tokens.weight.grad is None
    cfg = recipe(tmp_path / "dense", "flex", compile=True)
    cfg.optim.lookup_gradient = "dense"
    dense_trainer = Trainer(cfg, train_loader=loader())
    dense = dense_trainer.fit().losses
    assert dense_trainer.lookup_gradient == "dense"
    diffs = [abs(a - b) for a, b in zip(rows, dense, strict=True)]
    print(f"lookup rows against the dense gradient: max {max(diffs):.2e} (noise {noise:.4f})")
    assert max(diffs) <= noise


def test_non_finite_steps_are_skipped_on_the_gpu(tmp_path):
    """The update is queued before the host reads the step's values: a NaN step is skipped inside the
    kernel, and the host still counts it."""
    cfg = recipe(tmp_path, "flex", compile=False)
    cfg.trainer.max_steps = 6
    trainer = Trainer(cfg, train_loader=loader())
    trainer.setup()
    real = trainer._loss_sum
    trainer._loss_sum = lambda batch, mask, *a: real(batch, mask, *a) * (float("nan") if trainer.step == 3 else 1.0)
    weights = {}
    trainer.hooks["after_step"] = lambda tr, m: weights.__setitem__(tr.step, tr.raw_model.embed_tokens.weight.clone())
    result = trainer.fit()
    assert result.steps == 6 and trainer.nonfinite_total == 1 and torch.isnan(torch.tensor(result.losses[3]))
    assert torch.equal(weights[3], weights[4]) and not torch.equal(weights[4], weights[5])
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {5}


@pytest.mark.parametrize("weight_copies", ["true", "false"])
def test_a_run_stopped_and_resumed_on_a_gpu_continues_the_curve(tmp_path, weight_copies):
    """A SIGTERM after step 3 of 6, then a resume, gives the 6 straight steps: the train state comes back
    from the checkpoint (RNG states included) and the copies start from the resumed weights."""
    straight = recipe(tmp_path / "straight", "flex", compile=False, weight_copies=weight_copies)
    straight.trainer.max_steps = 6
    want = Trainer(straight, train_loader=loader()).fit().losses
    cfg = recipe(tmp_path / "resumed", "flex", compile=False, weight_copies=weight_copies)
    cfg.trainer.max_steps = 6
    first = Trainer(cfg, train_loader=loader())
    first.hooks["after_step"] = lambda tr, metrics: tr.step == 3 and os.kill(os.getpid(), signal.SIGTERM)
    stopped = first.fit()
    assert stopped.status == "interrupted" and stopped.steps == 3
    cfg.trainer.resume = "true"
    resumed = Trainer(cfg, train_loader=loader())
    got = stopped.losses + resumed.fit().losses
    assert resumed.weight_copies == (weight_copies == "true")
    print(f"straight {want}\nresumed  {got}")
    assert len(got) == 6
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-4
