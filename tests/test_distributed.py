"""torchrun on CPU (gloo): FSDP2 over 2 processes gives the losses of 1 process with the same global
batch, resumes exactly from its sharded checkpoint, and refuses a resume with another rank count."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lite.training.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "model=tiny",
    "attention=sdpa",
    "data.seq_len=64",
    "trainer.max_steps=6",
    "trainer.val_every=3",
    "trainer.save_every=3",
    "trainer.keep_last=3",
    "trainer.progress_bar=false",
    "trainer.sample_tokens=4",
    "trainer.device=cpu",
]


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "recipes/pretrain.py")]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            "29517",
            str(REPO / "recipes/pretrain.py"),
        ]
    return subprocess.run([*cmd, *COMMON, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    single = launch(1, "data.batch_size=4", f"run_dir={root}/single")
    assert single.returncode == 0, single.stderr[-2000:]
    double = launch(2, "data.batch_size=2", f"run_dir={root}/double")
    assert double.returncode == 0, double.stderr[-2000:]
    return root


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def test_two_ranks_match_one_process_with_the_same_global_batch(runs):
    one, two = losses(runs / "single"), losses(runs / "double")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    assert (runs / "double" / "hf" / "config.json").is_file()  # exported once, by rank 0
    assert sorted(p.name for p in (runs / "double" / "checkpoints" / "step_000006").iterdir()) == [
        "dcp",
        "meta.json",
        "rank00000.pt",
        "rank00001.pt",
    ]


def test_two_ranks_resume_exactly_from_a_sharded_checkpoint(runs):
    ckpt = runs / "double" / "checkpoints" / "step_000003"
    resumed = launch(2, "data.batch_size=2", f"run_dir={runs}/resumed", f"trainer.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(runs / "resumed") == losses(runs / "double")[3:]


def test_resume_with_another_number_of_ranks_is_refused(runs):
    ckpt = runs / "double" / "checkpoints" / "step_000003"
    proc = launch(1, "data.batch_size=4", f"run_dir={runs}/wrong", f"trainer.resume={ckpt}")
    assert proc.returncode != 0
    assert "saved by a torchrun run" in proc.stderr and "Traceback" not in proc.stderr


def test_clipping_inside_fused_adamw_under_fsdp2(tmp_path):
    """The fast step (clipping inside fused AdamW, run on the local shards of the DTensor parameters) gives
    the losses of the plain step (a separate clip pass, unfused AdamW) in one process; its state, still on
    the DTensors, goes through a sharded checkpoint and resumes exactly."""
    common = ["data.batch_size=2", "trainer.sample_tokens=0", "trainer.clip_grad_norm=0.05"]
    host = launch(
        1, *common, "data.batch_size=4", "trainer.save_every=0", "trainer.step_impl=plain", f"run_dir={tmp_path}/h"
    )
    assert host.returncode == 0, host.stderr[-2000:]
    device = launch(2, *common, "trainer.step_impl=fast", f"run_dir={tmp_path}/device")
    assert device.returncode == 0, device.stderr[-2000:]
    one, two = losses(tmp_path / "h"), losses(tmp_path / "device")
    assert len(one) == len(two) == 6
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    grad_norms = [r["grad_norm"] for r in read_metrics(tmp_path / "device")]
    assert min(grad_norms) > 0.05  # clipping was active on every step
    ckpt = tmp_path / "device" / "checkpoints" / "step_000003"
    resumed = launch(2, *common, "trainer.step_impl=fast", f"run_dir={tmp_path}/resumed", f"trainer.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "resumed") == two[3:]


def test_blocks_kept_unsharded_until_backward_give_the_same_losses(runs, tmp_path):
    """Also profiles two steps: rank 0 alone writes the trace and summary."""
    kept = launch(
        2,
        "data.batch_size=2",
        "trainer.reshard_after_forward=false",
        "trainer.save_every=0",
        "trainer.profile_steps=2",
        "trainer.profile_start=1",
        f"run_dir={tmp_path}",
    )
    assert kept.returncode == 0, kept.stderr[-2000:]
    one, two = losses(runs / "single"), losses(tmp_path)
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5
    assert sorted(p.name for p in (tmp_path / "profile").iterdir()) == ["summary.json", "trace_rank0.json.gz"]
