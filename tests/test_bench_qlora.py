"""scripts/bench_qlora.py at toy size on a CPU: nemo_lite's QLoRA row runs with its NF4 base and records what
the figures need; the bitsandbytes baseline, which needs CUDA, is recorded as skipped with the reason."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("torchao")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_the_toy_run_records_the_qlora_row_and_skips_the_cuda_baseline(tmp_path, monkeypatch):
    import bench_qlora

    from nemo_lite.training import run_dir

    # the benchmark turns the free-space check off for its process; the tests after this one need it back
    monkeypatch.setattr(run_dir, "FREE_SPACE_FACTOR", run_dir.FREE_SPACE_FACTOR)
    out = tmp_path / "qlora.json"
    argv = ["bench_qlora.py", "--shape", "toy", "--steps", "3", "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_qlora.main()
    saved = json.loads(out.read_text())
    ours, theirs = saved["rows"]
    assert ours["config"] == "nemo-qlora" and "error" not in ours, ours
    assert math.isfinite(ours["first_loss"]) and ours["tokens_per_s"] > 0
    assert "base linears in NF4" in ours["converters"][0]
    # r=16 on q, k, v, o, gate, up, down of 2 blocks of the toy shape (hidden 256, MLP 512, 4 KV heads of 64)
    per_block = 16 * ((256 + 256) * 4 + (256 + 512) * 3)
    assert ours["trainable_params"] == 2 * per_block
    assert theirs == {"config": "hf-bnb-qlora", "skipped": theirs["skipped"], "seconds": theirs["seconds"]}
    assert theirs["skipped"] in ("bitsandbytes not importable", "needs a CUDA GPU")
