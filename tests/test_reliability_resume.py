"""Resume survives damage: checksums in meta.json, a damaged newest checkpoint falls back to the one before,
a checkpoint of another shape is refused with what differs, a full disk during a save loses nothing, and
metrics.jsonl holds one record per step after a resume."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from omegaconf import OmegaConf
from recipe_utils import tiny_config

from nemo_lite.testing.data import SyntheticPackedLoader
from nemo_lite.testing.hooks import after_each_checkpoint_file
from nemo_lite.training import checkpoint as ckpt
from nemo_lite.training.metrics import read_metrics, truncate_metrics
from nemo_lite.training.trainer import Trainer


def quick_config(run_dir, steps=4, save_every=2):
    cfg = tiny_config(run_dir, "sdpa", steps=steps)
    t = cfg.trainer
    t.save_every, t.keep_last, t.val_every, t.sample_tokens, t.export_hf = save_every, 10, 0, 0, False
    return cfg


def quick_trainer(cfg) -> Trainer:
    """The tiny model on synthetic batches: no tokenizer or corpus to build, the same batches every time."""
    loader = SyntheticPackedLoader(4, 64, vocab_size=512, eos_id=0, seed=1, learnable=True)
    return Trainer(cfg, train_loader=loader)


def test_meta_json_carries_each_files_size_and_checksum(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 3, torch.nn.Linear(4, 4), {"step": 3}, keep_last=2)
    files = json.loads((path / ckpt.META_FILE).read_text())["files"]
    for name in (ckpt.MODEL_FILE, ckpt.STATE_FILE):
        assert files[name] == ckpt.file_record(path / name)
        assert files[name]["bytes"] == (path / name).stat().st_size
    raw = bytearray((path / ckpt.MODEL_FILE).read_bytes())
    raw[-1] ^= 0xFF  # one flipped byte in the last tensor: same size, the header still parses
    (path / ckpt.MODEL_FILE).write_bytes(bytes(raw))
    with pytest.raises(ckpt.CheckpointDamagedError, match="model.safetensors does not match its checksum"):
        ckpt.load_checkpoint(path, torch.nn.Linear(4, 4))


def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_is_used(tmp_path, capsys):
    Trainer_ = quick_trainer(quick_config(tmp_path))
    Trainer_.fit()
    newest = tmp_path / "checkpoints" / "step_000004"
    data = (newest / ckpt.MODEL_FILE).read_bytes()
    (newest / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])  # cut short (a disk that lost a write)
    capsys.readouterr()
    cfg = quick_config(tmp_path, steps=6)
    cfg.trainer.resume = "true"
    trainer = quick_trainer(cfg)
    trainer.setup()
    assert trainer.resumed_from == tmp_path / "checkpoints" / "step_000002" and trainer.step == 2
    err = capsys.readouterr().err
    assert f"checkpoint {newest} is damaged (model.safetensors has {len(data) // 2} bytes, {len(data)} were " in err
    assert "resuming from the one before it" in err
    assert trainer.fit().steps == 6


def test_no_usable_checkpoint_says_so_and_how_to_start_fresh(tmp_path):
    quick_trainer(quick_config(tmp_path)).fit()
    for path in ckpt.list_checkpoints(tmp_path / "checkpoints"):
        (path / ckpt.STATE_FILE).write_bytes(b"")
    cfg = quick_config(tmp_path)
    cfg.trainer.resume = "true"
    with pytest.raises(ckpt.ResumeError, match=r"no usable checkpoint in .*step_000004: train_state.pt has 0 bytes"):
        quick_trainer(cfg).fit()
    with pytest.raises(ckpt.ResumeError, match="start fresh with trainer.resume=false trainer.overwrite=true"):
        quick_trainer(cfg).fit()


def test_resuming_with_another_model_shape_or_data_layout_lists_what_differs(tmp_path):
    quick_trainer(quick_config(tmp_path)).fit()
    cfg = tiny_config(tmp_path / "other", "sdpa", steps=6)
    cfg.trainer.resume, cfg.trainer.val_every = str(tmp_path), 0
    cfg.model.overrides = {"num_hidden_layers": 3}
    cfg.data.seq_len = 32
    loader = SyntheticPackedLoader(4, 32, vocab_size=512, eos_id=0, seed=1, learnable=True)
    with pytest.raises(ckpt.ResumeError) as info:
        Trainer(cfg, train_loader=loader).fit()
    message = str(info.value)
    assert "step_000004: it was saved by a run of another shape" in message
    assert "model.num_hidden_layers 2 -> 3" in message and "data.seq_len 64 -> 32" in message
    assert "\n" not in message


def test_a_full_disk_during_a_save_removes_the_partial_checkpoint_and_names_the_last_one(tmp_path):
    trainer = quick_trainer(quick_config(tmp_path, steps=6))
    trainer.setup()

    def disk_full_at_step_4(name):
        if trainer.step == 4 and name == ckpt.STATE_FILE:
            raise OSError(errno.ENOSPC, "No space left on device")

    with (
        after_each_checkpoint_file(disk_full_at_step_4),
        pytest.raises(ckpt.CheckpointWriteError, match=r"disk is full.*the last complete one is .*step_000002"),
    ):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]  # no partial left


def test_a_writer_that_hides_the_errno_on_a_full_disk_is_still_reported_as_a_full_disk(tmp_path, monkeypatch):
    """torch's zip writer says "unexpected pos" when the disk fills; the free space tells what happened."""
    model = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(tmp_path, 1, model, {"step": 1}, keep_last=2)

    def torn(name):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    usage = ckpt.shutil.disk_usage
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(p)._replace(free=4096))
    full = pytest.raises(ckpt.CheckpointWriteError, match=r"disk is full.*step_000001")
    with full, after_each_checkpoint_file(torn):
        ckpt.save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=2)
    monkeypatch.setattr(ckpt.shutil, "disk_usage", usage)  # with room left, the same error is a bug: raised as is
    with pytest.raises(RuntimeError, match="unexpected pos"), after_each_checkpoint_file(torn):
        ckpt.save_checkpoint(tmp_path, 2, model, {"step": 2}, keep_last=2)


def test_metrics_after_a_resume_hold_one_record_per_step(tmp_path):
    quick_trainer(quick_config(tmp_path)).fit()  # steps 1-4, checkpoints at 2 and 4
    ckpt.list_checkpoints(tmp_path / "checkpoints")[-1].rename(tmp_path / "lost")  # as if step 4's save never came
    cfg = quick_config(tmp_path, steps=5)
    cfg.trainer.resume = "true"
    quick_trainer(cfg).fit()  # resumes at 2: steps 3 and 4 run again
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_truncating_metrics_keeps_the_resumed_steps_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert truncate_metrics(path, 3) == 3
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_damaged_checkpoint_named_in_trainer_resume_is_not_replaced_by_another(tmp_path):
    quick_trainer(quick_config(tmp_path)).fit()
    named = tmp_path / "checkpoints" / "step_000004"
    (named / ckpt.META_FILE).write_text("{")
    cfg = quick_config(tmp_path / "next", steps=6)
    cfg.trainer.resume = str(named)
    with pytest.raises(ckpt.ResumeError, match=r"step_000004: it is damaged \(meta.json cannot be read .*\); name"):
        quick_trainer(cfg).fit()
    cfg.trainer.resume = str(tmp_path)  # the run directory: its newest usable checkpoint
    trainer = quick_trainer(cfg)
    trainer.setup()
    assert trainer.resumed_from == tmp_path / "checkpoints" / "step_000002"


def test_a_resume_with_other_settings_keeps_the_earlier_config_yaml_beside_the_new(tmp_path, capsys):
    quick_trainer(quick_config(tmp_path)).fit()
    first = (tmp_path / "config.yaml").read_text()
    cfg = quick_config(tmp_path, steps=4)
    cfg.trainer.resume = "true"
    quick_trainer(cfg).fit()  # the run is finished: same settings, nothing kept aside
    assert (tmp_path / "config.yaml").read_text() != first  # trainer.resume=true is recorded ...
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.yaml"]  # ... but is no other setting
    capsys.readouterr()
    before = (tmp_path / "config.yaml").read_text()
    cfg = quick_config(tmp_path, steps=6)
    cfg.trainer.resume, cfg.optim.lr = "true", cfg.optim.lr / 2
    quick_trainer(cfg).fit()
    kept = tmp_path / "config-step_000004.yaml"
    assert kept.read_text() == before  # byte for byte
    assert OmegaConf.load(tmp_path / "config.yaml").optim.lr == cfg.optim.lr
    line = next(line for line in capsys.readouterr().err.splitlines() if "config-step_000004.yaml" in line)
    assert "trainer.max_steps 4 -> 6" in line and f"optim.lr {cfg.optim.lr * 2} -> {cfg.optim.lr}" in line
    cfg.trainer.max_steps, cfg.optim.lr = 8, cfg.optim.lr / 2  # again from step 6: one more kept, none replaced
    quick_trainer(cfg).fit()
    kept_all = sorted(p.name for p in tmp_path.glob("config-*.yaml"))
    assert kept_all == ["config-step_000004.yaml", "config-step_000006.yaml"]
    assert kept.read_text() == before
    cfg = quick_config(tmp_path, steps=2)
    cfg.trainer.overwrite = True  # a fresh run moves them aside with the rest of the earlier run
    quick_trainer(cfg).fit()
    (aside,) = tmp_path.glob("replaced-*")
    assert sorted(p.name for p in aside.glob("config*.yaml")) == [
        "config-step_000004.yaml",
        "config-step_000006.yaml",
        "config.yaml",
    ]
    assert not list(tmp_path.glob("config-*.yaml"))
