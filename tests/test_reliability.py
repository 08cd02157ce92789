"""Faults lose nothing: non-finite steps, kills during checkpoint writes, secrets, device constraints."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time

import pytest
import torch
from recipe_utils import tiny_config

from nemo_lite.testing.hooks import after_each_step
from nemo_lite.training import checkpoint as ckpt
from nemo_lite.training.config import ConfigError, RecipeConfig, validate_for_device
from nemo_lite.training.metrics import read_metrics
from nemo_lite.training.trainer import NonFiniteLossError, NonFiniteWeightsError, Trainer

KILL_TRIALS = 20  # quoted in docs/reliability.md
NAN_STEPS = (3, 4)


class PoisonedStep:
    """The trainer's step, whose loss is NaN on the given (1-based) steps, as a bad batch or an overflow."""

    def __init__(self, trainer: Trainer, steps) -> None:
        self.trainer, self.inner, self.steps = trainer, trainer.step_impl, steps

    def loss(self, *args, **kwargs):
        loss = self.inner.loss(*args, **kwargs)
        return loss * float("nan") if self.trainer.model.training and self.trainer.step + 1 in self.steps else loss

    def __getattr__(self, name):
        return getattr(self.inner, name)


def poison_steps(trainer: Trainer, steps) -> None:
    trainer.step_impl = PoisonedStep(trainer, steps)


# plain: the host sees the values, then clips and updates; fast: the clip and the skip inside fused AdamW
@pytest.mark.parametrize("step_impl", ["plain", "fast"])
def test_non_finite_steps_are_skipped_and_counted(tmp_path, step_impl):
    cfg = tiny_config(tmp_path, "sdpa", steps=8)
    cfg.trainer.step_impl = step_impl
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.step_impl.description.startswith(f"{step_impl} step")
    poison_steps(trainer, NAN_STEPS)
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    snapshots = {}
    after_each_step(
        trainer,
        lambda tr, m: snapshots.__setitem__(tr.step, {k: v.clone() for k, v in tr.raw_model.state_dict().items()}),
    )
    result = trainer.fit()
    assert result.status == "completed" and result.steps == 8
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["skipped_nonfinite"]] == list(NAN_STEPS)
    assert records[-1]["nonfinite_total"] == len(NAN_STEPS)
    assert all(math.isnan(r["loss"]) == (r["step"] in NAN_STEPS) for r in records)
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():  # strict JSON: null, never a bare NaN
        record = json.loads(line, parse_constant=lambda name: pytest.fail(f"metrics.jsonl holds a bare {name}"))
        if record["step"] in NAN_STEPS:
            assert record["loss"] is None and record["nonfinite_values"]["loss"] == "nan"
    for key in before:  # the poisoned steps changed no weight, and no weight is NaN at the end
        assert torch.equal(snapshots[2][key], snapshots[4][key])
        assert torch.isfinite(snapshots[8][key]).all()
    steps_taken = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps_taken == {8 - len(NAN_STEPS)}  # skipped steps do not advance AdamW's bias correction


def test_too_many_non_finite_steps_in_a_row_stop_with_the_last_checkpoint_intact(tmp_path):
    cfg = tiny_config(tmp_path, "sdpa", steps=20)
    cfg.trainer.save_every, cfg.trainer.max_consecutive_nonfinite = 4, 3
    trainer = Trainer(cfg)
    trainer.setup()
    poison_steps(trainer, range(6, 100))
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite steps in a row.*step_000004"):
        trainer.fit()
    latest = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert latest.name == "step_000004"
    state = ckpt.load_checkpoint(latest, _fresh_model(cfg))
    assert state["step"] == 4


def _fresh_model(cfg):
    """A model of ``cfg``'s shape, built by a trainer in a run directory of its own."""
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir + "-fresh")
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer.raw_model


def test_kills_during_checkpoint_writes_never_expose_a_partial_checkpoint(tmp_path):
    """Fork a writer that saves checkpoints in a loop; SIGKILL it at random moments."""
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])  # ~8 MB per save
    rng = random.Random(0)
    survived = mid_write = 0
    for trial in range(KILL_TRIALS):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer
            os.close(read_fd)
            try:
                step = 1000 * (trial + 1)
                os.write(write_fd, b"go")
                while True:
                    ckpt.save_checkpoint(tmp_path, step, model, {"step": step}, keep_last=2)
                    step += 1
            finally:
                os._exit(0)
        os.close(write_fd)
        os.read(read_fd, 2)
        os.close(read_fd)
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        mid_write += any(p.name.startswith(ckpt.TMP_PREFIX) for p in tmp_path.iterdir())
        latest = ckpt.latest_checkpoint(tmp_path)
        if latest is None:
            continue  # killed before the first save completed: nothing is exposed, which is right
        fresh = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
        state = ckpt.load_checkpoint(latest, fresh)
        assert state["step"] == int(latest.name.split("_")[1])
        for a, b in zip(fresh.parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)
        survived += 1
    print(
        f"\n{KILL_TRIALS} kills ({mid_write} caught a checkpoint half-written); "
        f"{survived} times the latest complete checkpoint loaded and matched"
    )
    assert survived >= KILL_TRIALS // 2  # most kills landed after at least one complete save


def test_secrets_in_the_environment_never_reach_the_run_directory(tmp_path, monkeypatch):
    secret = "wandb-secret-0123456789abcdef"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    Trainer(tiny_config(tmp_path, "sdpa", steps=2)).fit()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


def test_flex_on_gpu_refuses_a_sequence_length_it_cannot_keep_static():
    cfg = RecipeConfig()
    cfg.attention.backend, cfg.data.seq_len = "flex", 1000
    with pytest.raises(ConfigError, match="data.seq_len=1024"):
        validate_for_device(cfg, "cuda")
    validate_for_device(cfg, "cpu")  # the dense CPU path takes any length
    cfg.attention.backend = "sdpa"
    validate_for_device(cfg, "cuda")


class _NotData:
    """Stands for anything a pickle could smuggle in."""


def test_training_state_is_loaded_without_unpickling_objects(tmp_path):
    model = torch.nn.Linear(2, 2)
    path = ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=1)
    torch.save({"step": 1, "payload": _NotData()}, path / ckpt.STATE_FILE)  # a tampered state file
    meta = json.loads((path / ckpt.META_FILE).read_text())  # whose tamperer fixed the checksum too
    meta["files"][ckpt.STATE_FILE] = ckpt.file_record(path / ckpt.STATE_FILE)
    (path / ckpt.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(Exception, match="weights_only"):
        ckpt.load_checkpoint(path, torch.nn.Linear(2, 2))


def test_logger_wandb_without_wandb_installed_says_how_to_get_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    cfg = tiny_config(tmp_path, "sdpa", steps=2)
    cfg.logger.name = "wandb"
    with pytest.raises(ImportError, match=r"pip install 'nemo_lite\[wandb\]'.*logger=jsonl"):
        Trainer(cfg).fit()
    cfg.logger.name = "jsonl"  # everything but that logger works
    assert Trainer(cfg).fit().status == "completed"


def poison_weights_after_update(trainer: Trainer, step: int) -> None:
    """The optimizer's update of (1-based) ``step`` writes NaN into a weight, as a broken update would: one
    tensor's second moment is made negative first, so the update's square root is NaN."""
    optimizer = trainer.step_impl.optimizer
    real_step = optimizer.step

    def poisoned_step(*args, **kwargs):
        if trainer.step + 1 == step:
            state = next(s for g in optimizer.param_groups for p in g["params"] if (s := optimizer.state.get(p)))
            state["exp_avg_sq"].fill_(-1.0)
        return real_step(*args, **kwargs)

    optimizer.step = poisoned_step


# step 5: found by the weight check that rides with step 6's values; step 4: found by the check before the save
@pytest.mark.parametrize(("step_impl", "poisoned", "last_good"), [("plain", 5, 4), ("fast", 5, 4), ("plain", 4, 2)])
def test_non_finite_weights_stop_the_run_and_are_never_saved(tmp_path, step_impl, poisoned, last_good):
    cfg = tiny_config(tmp_path, "sdpa", steps=8)
    cfg.trainer.step_impl, cfg.trainer.save_every, cfg.trainer.keep_last = step_impl, 2, 10
    trainer = Trainer(cfg)
    trainer.setup()
    poison_weights_after_update(trainer, poisoned)
    with pytest.raises(NonFiniteWeightsError, match=rf"NaN or Inf in the weights.*step_{last_good:06d}$"):
        trainer.fit()
    saved = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [ckpt.step_of(p) for p in saved] == list(range(2, last_good + 1, 2))
    for path in saved:
        state = ckpt.load_checkpoint(path, _fresh_model(cfg))
        assert all(torch.isfinite(t).all() for t in state["optimizer"]["state"][0].values())
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for p in saved for t in load_file(p / ckpt.MODEL_FILE).values())


@pytest.mark.gpu
@pytest.mark.parametrize("step_impl", ["plain", "fast"])
def test_non_finite_weights_stop_the_run_on_the_gpu(tmp_path, step_impl):
    """On a GPU the weight check is queued behind the update (the fast step's Triton AdamW included) and
    read with the next step's values; the run stops before any save from those weights."""
    from nemo_lite.testing.data import SyntheticPackedLoader

    cfg = tiny_config(tmp_path, "sdpa", steps=8)
    t = cfg.trainer
    t.step_impl, t.save_every, t.keep_last, t.val_every, t.sample_tokens, t.export_hf = step_impl, 2, 10, 0, 0, False
    loader = SyntheticPackedLoader(4, 64, vocab_size=512, eos_id=0, seed=1, learnable=True)
    trainer = Trainer(cfg, train_loader=loader)
    trainer.setup()
    assert trainer.device.type == "cuda"
    poison_weights_after_update(trainer, 5)
    with pytest.raises(NonFiniteWeightsError, match=r"^step 5: .*step_000004$"):
        trainer.fit()
    assert [ckpt.step_of(p) for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [2, 4]


def test_checkpoint_and_export_files_are_as_readable_as_the_rest_of_the_run(tmp_path):
    """safetensors writes its files 0600; a run's weights get the mode of its other files (0644 under umask 022)."""
    cfg = tiny_config(tmp_path, "sdpa", steps=2)
    cfg.trainer.export_hf, cfg.trainer.sample_tokens = True, 0
    Trainer(cfg).fit()
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert "hf/model.safetensors" in modes and "checkpoints/step_000002/model.safetensors" in modes
    assert set(modes.values()) == {(tmp_path / "config.yaml").stat().st_mode & 0o777}, modes
