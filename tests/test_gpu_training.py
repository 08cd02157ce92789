"""GPU: the compiled training step follows the uncompiled loss curve, backends agree, and the fast step
(trainer.step_impl=auto on a GPU) follows the plain step's curve, in bf16; non-finite steps are skipped and
a stopped run resumes the curve, with either step."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from nemo_lite.testing.data import SyntheticPackedLoader
from nemo_lite.testing.hooks import after_each_step
from nemo_lite.training.config import RecipeConfig
from nemo_lite.training.fast import step as fast_step_module
from nemo_lite.training.fast.step import FastStep
from nemo_lite.training.fast.swaps import CopyLinear, RowsEmbedding
from nemo_lite.training.step import PlainStep
from nemo_lite.training.trainer import Trainer

pytestmark = pytest.mark.gpu
STEPS = 20


def recipe(tmp_path, backend: str, compile: bool, chunk: int = 0, step_impl: str = "auto") -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.run_dir = str(tmp_path / f"{backend}-{compile}-{chunk}-{step_impl}")
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
    t.step_impl = step_impl
    t.overwrite = True  # curves are run again in one directory: each replaces the one before
    return cfg


def loader():
    return SyntheticPackedLoader(
        2, 1024, vocab_size=8192, eos_id=3, mean_doc=200, seed=1, pin_memory=True, learnable=True
    )


def curve(tmp_path, backend: str, compile: bool, chunk: int = 0, step_impl: str = "auto") -> list[float]:
    cfg = recipe(tmp_path, backend, compile, chunk, step_impl)
    return Trainer(cfg, train_loader=loader()).fit().losses


ALL_ON = {"Triton AdamW": True, "bf16 weight copies": True, "Triton loss": True, "embedding gradient as rows": True}


def assert_copies_are_the_weights_rounded(trainer: Trainer) -> None:
    """Every bf16 copy the fast step keeps is its float32 weight rounded as autocast's cast rounds."""
    step = trainer.step_impl
    layers = [m for m in trainer.raw_model.modules() if isinstance(m, CopyLinear)]
    assert layers and all(step.copies[m.weight] is m.weight_copy for m in layers)
    assert step.output_copy is step.copies[trainer.raw_model.output_weight]
    for param, weight_copy in step.copies.items():
        assert torch.equal(weight_copy, param.to(torch.bfloat16))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uncompiled flex curve of the default step on a GPU (the fast step, every part on), and bf16's
    own noise: the same step with only the loss's reduction order changed (chunked, so the torch loss),
    which any other numerically-equivalent path is compared against."""
    tmp = tmp_path_factory.mktemp("ref")
    trainer = Trainer(recipe(tmp, "flex", compile=False), train_loader=loader())
    base = trainer.fit().losses
    assert isinstance(trainer.step_impl, FastStep) and trainer.step_impl.on == ALL_ON, trainer.step_impl.description
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


def test_the_fast_step_follows_the_plain_curve(tmp_path, reference):
    """trainer.step_impl=fast, compiled (Triton AdamW, bf16 weight copies, lookup rows, Triton loss) against
    trainer.step_impl=plain (torch's AdamW, clip_grad_norm_'s arithmetic, torch's loss): numerically the
    same step, so within bf16's noise; the copies end equal to the float32 weights rounded."""
    trainer = Trainer(recipe(tmp_path, "flex", compile=True, step_impl="fast"), train_loader=loader())
    fast = trainer.fit().losses
    assert trainer.step_impl.on == ALL_ON
    assert_copies_are_the_weights_rounded(trainer)
    assert isinstance(trainer.raw_model.embed_tokens, RowsEmbedding)
    plain_trainer = Trainer(recipe(tmp_path, "flex", compile=True, step_impl="plain"), train_loader=loader())
    plain = plain_trainer.fit().losses
    assert isinstance(plain_trainer.step_impl, PlainStep)
    assert not any(isinstance(m, CopyLinear | RowsEmbedding) for m in plain_trainer.raw_model.modules())
    assert_same_curve("fast step against the plain step", fast, (plain, reference[1]))


@pytest.mark.parametrize("off", ["weight copies and lookup rows", "lookup rows"])
def test_weight_copies_and_lookup_rows_leave_the_curve_as_it_was(tmp_path, reference, monkeypatch, off):
    """The fast step with its converters kept off (the Triton AdamW kernel and the Triton loss still on):
    the bf16 copies give what autocast's casts give, and the lookup rows what the dense embedding gradient
    gives, so the curve is the reference's within bf16's noise (nothing but the last bits may differ)."""
    base, noise = reference
    monkeypatch.setattr(fast_step_module, "swap_in_lookup_rows", lambda model: {})
    if off == "weight copies and lookup rows":
        monkeypatch.setattr(fast_step_module, "swap_in_weight_copies", lambda model, output_weight: {})
    trainer = Trainer(recipe(tmp_path, "flex", compile=False), train_loader=loader())
    losses = trainer.fit().losses
    step = trainer.step_impl
    assert step.optimizer.kernel == "triton" and step.on["Triton loss"] and not step.rows
    assert not isinstance(trainer.raw_model.embed_tokens, RowsEmbedding)
    if off == "lookup rows":
        assert_copies_are_the_weights_rounded(trainer)
    else:
        assert not step.copies and not any(isinstance(m, CopyLinear) for m in trainer.raw_model.modules())
    diffs = [abs(a - b) for a, b in zip(base, losses, strict=True)]
    print(f"without {off}: max {max(diffs):.2e} (noise {noise:.4f})")
    assert max(diffs) <= noise


@pytest.mark.parametrize("step_impl", ["fast", "plain"])
def test_non_finite_steps_are_skipped_on_the_gpu(tmp_path, step_impl):
    """A NaN step is skipped (by the fast step inside the kernel, its update queued before the host reads the
    step's values; by the plain step on the host) and the host still counts it."""
    cfg = recipe(tmp_path, "flex", compile=False, step_impl=step_impl)
    cfg.trainer.max_steps = 6
    trainer = Trainer(cfg, train_loader=loader())
    trainer.setup()
    step = trainer.step_impl
    real = step.loss
    step.loss = lambda *args: real(*args) * (float("nan") if trainer.step == 3 else 1.0)
    weights = {}
    after_each_step(trainer, lambda tr, m: weights.__setitem__(tr.step, tr.raw_model.embed_tokens.weight.clone()))
    result = trainer.fit()
    assert result.steps == 6 and trainer.nonfinite_total == 1 and torch.isnan(torch.tensor(result.losses[3]))
    assert torch.equal(weights[3], weights[4]) and not torch.equal(weights[4], weights[5])
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {5}
    if step_impl == "fast":
        assert_copies_are_the_weights_rounded(trainer)


@pytest.mark.parametrize("step_impl", ["fast", "plain"])
def test_a_run_stopped_and_resumed_on_a_gpu_continues_the_curve(tmp_path, step_impl):
    """A SIGTERM after step 3 of 6, then a resume, gives the 6 straight steps: the train state comes back
    from the checkpoint (RNG states included) and the copies start from the resumed weights."""
    straight = recipe(tmp_path / "straight", "flex", compile=False, step_impl=step_impl)
    straight.trainer.max_steps = 6
    want = Trainer(straight, train_loader=loader()).fit().losses
    cfg = recipe(tmp_path / "resumed", "flex", compile=False, step_impl=step_impl)
    cfg.trainer.max_steps = 6
    first = Trainer(cfg, train_loader=loader())
    after_each_step(first, lambda tr, metrics: tr.step == 3 and os.kill(os.getpid(), signal.SIGTERM))
    stopped = first.fit()
    assert stopped.status == "interrupted" and stopped.steps == 3
    cfg.trainer.resume = "true"
    resumed = Trainer(cfg, train_loader=loader())
    resumed.setup()
    assert type(resumed.step_impl) is (FastStep if step_impl == "fast" else PlainStep)
    assert resumed.step == 3
    if step_impl == "fast":  # rounded from the loaded weights, not from the fresh initialization
        assert_copies_are_the_weights_rounded(resumed)
    got = stopped.losses + resumed.fit().losses
    print(f"straight {want}\nresumed  {got}")
    assert len(got) == 6
    for a, b in zip(got, want, strict=True):
        assert abs(a - b) <= 1e-4


def test_a_checkpoint_of_one_step_resumes_under_the_other(tmp_path):
    """Both steps write torch's AdamW state layout: a run of the plain step resumes under the fast step
    (and back) and goes on training."""
    cfg = recipe(tmp_path, "flex", compile=False, step_impl="plain")
    cfg.trainer.max_steps = 3
    Trainer(cfg, train_loader=loader()).fit()
    for step_impl, steps in (("fast", 5), ("plain", 7)):
        cfg.trainer.step_impl, cfg.trainer.resume, cfg.trainer.max_steps = step_impl, "true", steps
        trainer = Trainer(cfg, train_loader=loader())
        result = trainer.fit()
        assert result.steps == steps and all(math.isfinite(x) for x in result.losses)
        assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {steps}
