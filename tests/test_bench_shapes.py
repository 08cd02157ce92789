"""scripts/bench_shapes.py at toy size on a CPU: its rows in their order, each run with its activation
checkpointing and loss chunking, and the rows that the run's own memory check refuses recorded as such."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

FREE = 8 * 2**20  # bytes: the tiny model's 2 x 32 tokens fit, its 2048 x 32 do not


@pytest.fixture
def bench(monkeypatch):
    import bench_shapes

    from nemo_lite.training import run_dir

    # the benchmark turns the free-space check off for its process; the tests after this one need it back
    monkeypatch.setattr(run_dir, "FREE_SPACE_FACTOR", run_dir.FREE_SPACE_FACTOR)
    monkeypatch.setattr(run_dir, "available_memory", lambda device_type, device_index=None: FREE)
    return bench_shapes


def test_the_rows_run_in_order_and_a_row_that_cannot_fit_is_refused_by_the_runs_own_check(bench, tmp_path):
    from nemo_lite.training import run_dir

    out = tmp_path / "shapes.json"
    argv = ["--presets", "tiny", "--tokens", "2x32,2048x32", "--ac", "none,full", "--chunk", "0,16", "--steps", "2",
            "--no-compile", "--out", str(out), "--run-dir", str(tmp_path / "runs")]  # fmt: skip
    rows = bench.main(argv)
    # tier 1 (the loss a run of that size would use: unchunked at 64 tokens, chunked at 65536), then the A/B
    assert [r["config"] for r in rows] == [
        "tiny-2x32-none-nochunk", "tiny-2x32-full-nochunk",
        "tiny-2048x32-full-chunk16", "tiny-2048x32-none-chunk16",
        "tiny-2x32-none-chunk16", "tiny-2x32-full-chunk16",
        "tiny-2048x32-full-nochunk", "tiny-2048x32-none-nochunk",
    ]  # fmt: skip
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows, default=str))
    ran, refused = rows[:2] + rows[4:6], rows[2:4] + rows[6:]
    for r in ran:
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["peak_rss_gib"] > 0
        assert r["floor_gib"] <= r["free_gib"] == FREE / 2**30
        # recomputing blocks or chunking the loss changes no number: every row trains the same function
        assert r["first_loss"] == pytest.approx(math.log(512), abs=0.3)
        assert r["first_loss"] == pytest.approx(ran[0]["first_loss"], abs=1e-5)
        assert r["last_loss"] == pytest.approx(ran[0]["last_loss"], abs=1e-4)
    assert {(r["ac"], r["loss_chunk_size"]) for r in ran} == {("none", 0), ("full", 0), ("none", 16), ("full", 16)}
    for r in refused:
        assert "tokens_per_s" not in r and r["floor_gib"] > r["free_gib"]
        assert r["refused"].startswith("data.batch_size=2048 x data.seq_len=32 x trainer.grad_accum=1 needs at least")
        assert r["refused"].endswith("lower data.seq_len, data.batch_size or trainer.grad_accum")
    # the message is the run's own check's, word for word
    from nemo_lite.components.models import get_preset
    from nemo_lite.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        run_dir.check_model_fits(get_preset("tiny"), what="tiny", device_type="cpu", device_index=None,
                                 world_size=1, step=run_dir.StepShape(2048, 32, 1, 2))  # fmt: skip
    assert refused[0]["refused"] == str(info.value)


def test_no_row_starts_once_the_budget_is_spent(bench, tmp_path):
    argv = ["--presets", "tiny", "--tokens", "2x32", "--ac", "full", "--chunk", "0", "--steps", "2",
            "--budget-s", "0", "--out", str(tmp_path / "s.json"), "--run-dir", str(tmp_path / "runs")]  # fmt: skip
    rows = bench.main(argv)
    assert [r["config"] for r in rows] == ["tiny-2x32-full-nochunk"]
    assert rows[0]["not_started"].startswith("--budget-s 0") and "tokens_per_s" not in rows[0]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--presets", "llama-9b", "--presets: unknown model preset 'llama-9b'; valid presets:"),
        ("--tokens", "4096x", "--tokens takes N or BxS (positive integers), e.g. 4096 or 2x4096; got '4096x'"),
        ("--ac", "some", "--ac takes none, full, selective; got some"),
        ("--chunk", "-1", "--chunk takes integers >= 0 (0: unchunked loss); got '-1'"),
    ],
)
def test_bad_flags_are_refused_in_one_line(bench, flag, value, message):
    with pytest.raises(SystemExit) as info:
        bench.main(["--presets", "tiny", flag, value])
    assert str(info.value).startswith(message)
