"""A run owns its run directory: one run at a time, a fresh run never buries an earlier one's checkpoints,
temporary directories of live writers are left alone, and the directory is checked before any work."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
import torch
from recipe_utils import tiny_config

from nemo_lite.training import checkpoint as ckpt
from nemo_lite.training import run_dir as rundir
from nemo_lite.training.config import ConfigError
from nemo_lite.training.trainer import Trainer


def _never_build_data(self):
    raise AssertionError("the data were built before the run directory was checked")


@pytest.fixture
def sleeper():
    """A live process of this host (its pid names a writer that is still running)."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_run_on_the_same_run_dir_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from nemo_lite.training.run_dir import RunLock; "
            "RunLock(Path(sys.argv[1])); print('locked', flush=True); sys.stdin.read()",
            str(run),
        ],
        stdin=subprocess.PIPE,  # it holds the lock until killed, however slow the machine
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tiny_config(run, "sdpa", steps=2)
        with pytest.raises(rundir.RunDirError, match=rf"in use by another run \(pid {holder.pid} on "):
            Trainer(cfg).fit()
    finally:
        holder.kill()  # SIGKILL: the kernel drops its lock, no stale lock is left
        holder.wait()
    assert Trainer(cfg).fit().status == "completed"


def test_a_fresh_run_refuses_a_run_dir_with_checkpoints_and_overwrite_moves_them_aside(tmp_path):
    old = tiny_config(tmp_path, "sdpa", steps=4)
    old.trainer.save_every, old.trainer.val_every = 2, 0
    Trainer(old).fit()
    earlier = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert earlier == ["step_000002", "step_000004"]

    new = tiny_config(tmp_path, "sdpa", steps=2)
    new.trainer.val_every = 0
    with pytest.raises(rundir.RunDirError, match="trainer.resume=true.*another run_dir.*trainer.overwrite=true"):
        Trainer(new).fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == earlier  # untouched

    new.trainer.overwrite = True
    result = Trainer(new).fit()
    # the new run keeps its own checkpoint (the earlier run's higher steps no longer prune it away) ...
    assert result.last_checkpoint == tmp_path / "checkpoints" / "step_000002"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_000002"]
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2]
    # ... and the earlier run's files were moved, not deleted
    (aside,) = tmp_path.glob("replaced-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == earlier
    assert (aside / "metrics.jsonl").is_file() and (aside / "config.yaml").is_file()


def _metrics(run_dir):
    from nemo_lite.training.metrics import read_metrics

    return read_metrics(run_dir)


def test_a_save_removes_only_the_temporary_directories_of_writers_that_are_gone(tmp_path, sleeper):
    root = tmp_path / "checkpoints"
    root.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = rundir.host()
    live_peer = root / f".tmp-step_000007-{here}-{sleeper.pid}"
    other_host = root / ".tmp-step_000007-some-other-host-1"
    crashed = root / f".tmp-step_000005-{here}-{int(dead.stdout)}"
    for path in (live_peer, other_host, crashed):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    ckpt.save_checkpoint(root, 1, torch.nn.Linear(2, 2), {"step": 1}, keep_last=2)
    assert live_peer.is_dir() and other_host.is_dir()
    assert not crashed.exists()


def test_a_run_dir_that_is_a_file_is_refused_before_the_data_are_built(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_build_data", _never_build_data)
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(rundir.RunDirError, match=r"run_dir .*/run is a file, not a directory: choose another"):
        Trainer(tiny_config(tmp_path / "run")).fit()


def test_a_run_dir_that_cannot_be_written_is_refused_before_the_data_are_built(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_build_data", _never_build_data)
    real_write = rundir.Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_write(self, data)

    monkeypatch.setattr(rundir.Path, "write_bytes", read_only)  # root writes anywhere: fake a read-only mount
    with pytest.raises(rundir.RunDirError, match="is not writable .*Read-only file system.*choose another run_dir"):
        Trainer(tiny_config(tmp_path / "run")).fit()


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_the_data_are_built(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_build_data", _never_build_data)
    real_usage = rundir.shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1_000_000))
    with pytest.raises(rundir.RunDirError, match=r"has 1.0 MB free; the checkpoints need about \d+\.\d MB"):
        Trainer(tiny_config(tmp_path / "run")).fit()


def test_a_model_far_too_large_for_memory_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "_build_data", _never_build_data)
    monkeypatch.setattr(Trainer, "_build_model", _never_build_data)
    cfg = tiny_config(tmp_path / "run")
    cfg.model.overrides = {"num_hidden_layers": 5_000_000}
    with pytest.raises(ConfigError, match="num_hidden_layers=5000000.*choose a smaller shape"):
        Trainer(cfg).fit()


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    cfg.model.overrides = {"vocab_size": 256}  # the default tokenizer has 8192 ids
    with pytest.raises(ConfigError, match="tokenizer has 8192 ids but the model's vocabulary has 256"):
        Trainer(cfg).fit()


def test_a_resume_after_a_full_disk_counts_the_space_its_own_checkpoints_hold(tmp_path, monkeypatch):
    # A save writes the new checkpoint before pruning an old one: resuming needs the 3 checkpoints' room less what
    # the run's own checkpoints already hold, and never less than one checkpoint free.
    cfg = tiny_config(tmp_path / "run", "sdpa", steps=4)
    cfg.trainer.save_every, cfg.trainer.val_every = 2, 0
    first = Trainer(cfg)
    first.fit()
    held = sum(f.stat().st_size for f in (tmp_path / "run" / "checkpoints").rglob("*") if f.is_file())
    one = rundir.checkpoint_bytes(max(first.n_params, first._params_estimate))
    assert held > one  # two checkpoints
    real_usage = rundir.shutil.disk_usage
    free = {"bytes": max(rundir.FREE_SPACE_FACTOR * one - held, one) + 10_000}
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=free["bytes"]))
    cfg.trainer.max_steps, cfg.trainer.resume = 6, "true"
    assert free["bytes"] < rundir.FREE_SPACE_FACTOR * one  # a fresh run would be refused
    result = Trainer(cfg).fit()
    assert result.status == "completed" and result.steps == 6
    free["bytes"] = 1_000_000  # less than one checkpoint: still refused, saying what its checkpoints hold
    cfg.trainer.max_steps = 8
    refused = r"has 1.0 MB free; resuming needs about .* its checkpoints hold"
    with pytest.raises(rundir.RunDirError, match=refused) as info:
        Trainer(cfg).fit()
    assert "\n" not in str(info.value)


def test_a_free_space_factor_of_zero_turns_the_check_off(tmp_path, monkeypatch):
    # The benchmarks write no checkpoint and set the factor to 0: no space is needed, and nothing divides by it.
    monkeypatch.setattr(rundir, "FREE_SPACE_FACTOR", 0)
    real_usage = rundir.shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    rundir.check_free_space(tmp_path, 0)
    rundir.check_free_space(tmp_path, 0, held_bytes=10)
    monkeypatch.setattr(rundir, "FREE_SPACE_FACTOR", 3)
    with pytest.raises(rundir.RunDirError, match="has 0 B free"):
        rundir.check_free_space(tmp_path, 3_000)
