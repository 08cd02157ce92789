"""peft=lora under torchrun on CPU (gloo): FSDP2 over frozen base weights and trainable adapters gives the
losses of one process with the same global batch, saves only the adapters in its sharded checkpoint,
resumes exactly from it, and exports the adapter and merged directories once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

from test_lora import write_base  # noqa: E402

from nemo_lite.testing.net import free_port  # noqa: E402
from nemo_lite.training.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def launch(nproc: int, base: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
    ]
    cmd = [*(torchrun if nproc > 1 else [sys.executable]), str(REPO / "recipes/finetune.py")]
    common = [
        f"model.pretrained_path={base}",
        "peft=lora",
        "peft.r=4",
        "attention=sdpa",
        "data.seq_len=64",
        "trainer.max_steps=4",
        "trainer.val_every=0",
        "trainer.save_every=2",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=4",
        "trainer.device=cpu",
    ]
    return subprocess.run([*cmd, *common, *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def test_fsdp2_trains_saves_and_resumes_the_adapters(tmp_path):
    import torch.distributed.checkpoint as dcp

    base = write_base(tmp_path / "base")
    single = launch(1, base, "data.batch_size=4", f"run_dir={tmp_path}/single")
    assert single.returncode == 0, single.stderr[-2000:]
    double = launch(2, base, "data.batch_size=2", f"run_dir={tmp_path}/double")
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "double")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5

    ckpt = tmp_path / "double" / "checkpoints" / "step_000002"
    saved = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    weights = [key for key in saved if key.startswith("model.")]
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "hf/config.json"):
        assert (tmp_path / "double" / name).is_file()

    resumed = launch(2, base, "data.batch_size=2", f"run_dir={tmp_path}/resumed", f"trainer.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "resumed") == two[2:]
