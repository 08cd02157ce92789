"""Exports are kept like checkpoints: a fresh run moves an earlier run's exports aside with its checkpoints (and
only once every refusal has been made), a finished run whose export is missing exports on resume, a SIGTERM
during the export leaves nothing half-written behind, and a full disk during it is reported as a full disk."""

from __future__ import annotations

import os
import shutil
import signal

import pytest
from recipe_utils import tiny_config

from nemo_lite.training import run_dir as rundir
from nemo_lite.training.config import ConfigError
from nemo_lite.training.launch import user_error_line
from nemo_lite.training.trainer import Trainer


def _config(run_dir, **trainer):
    cfg = tiny_config(run_dir, "sdpa", steps=2)
    t = cfg.trainer
    t.val_every, t.sample_tokens, t.export_hf = 0, 0, True
    for key, value in trainer.items():
        setattr(t, key, value)
    return cfg


def _listing(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


def _log_lines(capsys) -> list[str]:
    return [line.removeprefix("[nemo_lite] ") for line in capsys.readouterr().err.splitlines()]


def test_overwrite_moves_the_earlier_exports_aside_with_the_checkpoints(tmp_path):
    Trainer(_config(tmp_path)).fit()
    earlier_weights = (tmp_path / "hf" / "model.safetensors").read_bytes()
    (tmp_path / "adapter").mkdir()  # as a LoRA run leaves it
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")

    new = _config(tmp_path, overwrite=True, seed=7)
    Trainer(new).fit()
    (aside,) = tmp_path.glob("replaced-*")
    assert {"checkpoints", "metrics.jsonl", "config.yaml", "hf", "adapter", "export.json"} <= {
        p.name for p in aside.iterdir()
    }
    assert (aside / "hf" / "model.safetensors").read_bytes() == earlier_weights  # moved, not replaced
    assert (aside / "adapter" / "adapter_config.json").read_text() == "{}"
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != earlier_weights  # the new run's own
    assert not (tmp_path / "adapter").exists()


def test_a_run_refused_after_the_run_dir_check_leaves_the_earlier_run_where_it_was(tmp_path):
    Trainer(_config(tmp_path, export_hf=False)).fit()
    before = _listing(tmp_path)
    refused = _config(tmp_path, overwrite=True)
    refused.float8.enabled = True  # refused on a CPU (or without torchao) once the model is built
    with pytest.raises(ConfigError, match="float8.enabled=true needs"):
        Trainer(refused).fit()
    assert _listing(tmp_path) == before
    assert Trainer(_config(tmp_path, export_hf=False, resume="true")).fit().status == "finished before"


@pytest.mark.parametrize("left", ["nothing", "an export without its marker"])
def test_resuming_a_finished_run_without_its_export_exports_it(tmp_path, capsys, left):
    Trainer(_config(tmp_path)).fit()
    (tmp_path / "export.json").unlink(missing_ok=True)  # killed before the export finished (written last)
    if left == "nothing":
        os.rename(tmp_path / "hf", tmp_path / "elsewhere")
    capsys.readouterr()

    result = Trainer(_config(tmp_path, resume="true")).fit()
    assert result.status == "finished before"
    assert result.hf_dir == tmp_path / "hf" and (tmp_path / "hf" / "model.safetensors").is_file()
    lines = _log_lines(capsys)
    assert any(
        line.endswith("the run is finished but its export is missing or incomplete: exporting it now") for line in lines
    )
    assert (tmp_path / "export.json").is_file()

    Trainer(_config(tmp_path, resume="true")).fit()  # now there is nothing to do
    assert any(line.endswith("nothing to do (raise trainer.max_steps to train on)") for line in _log_lines(capsys))


class _PreviousHandler(Exception):
    """Raised by the test's own SIGTERM handler: the signal reached a handler the export does not own."""


def test_sigterm_during_the_export_leaves_no_temporary_directory_and_resume_exports(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    from nemo_lite.training import distributed
    from nemo_lite.training.launch import run_recipe

    real = safetensors.torch.save_file

    def save_then_sigterm(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        if ".hf.tmp-" in str(filename):  # the export's weights are written, the rest is not
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_sigterm)
    monkeypatch.setattr(distributed, "shutdown", lambda: None)

    def previous(signum, frame):
        raise _PreviousHandler

    old = signal.signal(signal.SIGTERM, previous)
    try:
        capsys.readouterr()
        assert run_recipe(_config(tmp_path)) == 143
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not list(tmp_path.glob(".hf.*")) and not (tmp_path / "hf").exists()
    assert not (tmp_path / "export.json").exists()
    lines = [line for line in _log_lines(capsys) if "interrupted" in line or "SIGTERM" in line]
    assert lines == [
        "received SIGTERM during the export, which was stopped without leaving temporary files; resume with "
        "trainer.resume=true to redo the export of step 2"
    ]

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    result = Trainer(_config(tmp_path, resume="true")).fit()
    assert result.hf_dir == tmp_path / "hf" and (tmp_path / "export.json").is_file()


def test_a_full_disk_during_the_export_is_reported_as_a_full_disk_naming_the_file(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):  # the export's writes fail as safetensors reports ENOSPC
        if ".hf.tmp-" not in str(filename):
            return real(tensors, filename, *args, **kwargs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as err:
        Trainer(_config(tmp_path)).fit()
    assert user_error_line(err.value) == (
        f"the disk is full: writing {tmp_path / 'hf' / 'model.safetensors'} failed; free some space or choose "
        "another run_dir"
    )
    assert not list(tmp_path.glob(".hf.*")) and not (tmp_path / "hf").exists()


def test_a_sigterm_between_the_renames_of_a_re_export_waits_until_the_new_export_is_in_place(tmp_path, monkeypatch):
    from nemo_lite.components.models import hf

    Trainer(_config(tmp_path)).fit()
    (tmp_path / "export.json").unlink()  # a finished run whose export is to be redone over the earlier one
    real = os.rename

    def rename_then_sigterm(src, dst):
        real(src, dst)
        if ".hf.old-" in str(dst):  # the earlier export is aside, the new one not yet in its place
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(hf.os, "rename", rename_then_sigterm)
    result = Trainer(_config(tmp_path, resume="true")).fit()
    monkeypatch.setattr(hf.os, "rename", real)
    assert (result.status, result.signal, result.stopped_in) == ("interrupted", signal.SIGTERM, "export")
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # never a moment without hf/ that a kill could keep
    assert not list(tmp_path.glob(".hf.*")) and not (tmp_path / "export.json").exists()


def test_a_fresh_run_from_an_export_it_would_move_aside_is_refused(tmp_path):
    Trainer(_config(tmp_path)).fit()
    before = _listing(tmp_path)
    cfg = _config(tmp_path, overwrite=True)
    cfg.model.pretrained_path = str(tmp_path / "hf")
    with pytest.raises(rundir.RunDirError, match=r"model.pretrained_path .*/hf is the earlier run's hf in run_dir"):
        Trainer(cfg).fit()
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("export", ["adapter", "hf"])
def test_resume_in_a_run_dir_with_an_export_but_no_checkpoint_says_there_is_nothing_to_resume(tmp_path, export):
    """A run_dir whose checkpoints were removed to keep the export only (or an adapter copied in): trainer.resume=true
    is refused in one line naming how to start from the export, and the export stays where it was."""
    Trainer(_config(tmp_path)).fit()
    shutil.rmtree(tmp_path / "checkpoints")
    if export == "adapter":
        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    before = _listing(tmp_path)
    with pytest.raises(rundir.RunDirError) as info:
        Trainer(_config(tmp_path, resume=True)).fit()
    message = str(info.value)
    assert "\n" not in message and "but no checkpoint, so trainer.resume=true has nothing to resume" in message
    start = f"peft=lora peft.adapter_path={tmp_path / 'adapter'}" if export == "adapter" else "model.pretrained_path="
    assert start in message
    assert _listing(tmp_path) == before
    assert Trainer(_config(tmp_path, resume=False)).fit().status == "completed"  # starting fresh is still one flag
    (aside,) = tmp_path.glob("replaced-*")
    assert (aside / "hf" / "model.safetensors").is_file()
