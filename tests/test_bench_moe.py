"""scripts/bench_moe.py at toy size on a CPU: every kind of config (nemo_lite's trainer, transformers' MoE and
nemo_lite / transformers + PEFT LoRA on gpt-oss) runs, with its losses, and the results file records them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_every_kind_of_config_runs_and_is_recorded(tmp_path, monkeypatch):
    import bench_moe

    from nemo_lite.training import run_dir

    # the benchmark turns the free-space check off for its process; the tests after this one need it back
    monkeypatch.setattr(run_dir, "FREE_SPACE_FACTOR", run_dir.FREE_SPACE_FACTOR)
    out = tmp_path / "moe.json"
    names = ["flex", "flex-compile-loop", "hf-eager", "lora-gpt-oss", "hf-peft-gpt-oss"]
    rows = bench_moe.main(["--size", "toy", "--steps", "3", "--configs", ",".join(names), "--out", str(out)])
    assert [r["config"] for r in rows] == names
    for row in rows:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0 and math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
        assert row["recompiles_after_step_2"] == 0  # nothing is compiled on a CPU
    # nemo_lite and transformers start from their own random weights: both near ln(vocab) at step 1
    assert abs(rows[0]["first_loss"] - math.log(151646)) < 1.0
    assert rows[0]["expert_load_imbalance"] >= 1.0  # the busiest expert's load over the mean
    assert rows[3]["trainable"] == rows[4]["trainable"]  # the same adapters on both sides
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows, default=str))
    assert saved["meta"]["active_parameters"] < saved["meta"]["parameters"]
