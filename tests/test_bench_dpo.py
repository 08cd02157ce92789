"""scripts/bench_dpo.py runs at toy size on a CPU: every config it times on the GPU, for two steps."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_every_config_of_the_dpo_benchmark_runs_at_toy_size(monkeypatch, tmp_path):
    pytest.importorskip("trl")
    import bench_dpo

    from nemo_lite.training import run_dir

    # the benchmark turns the free-space check off for its process; the tests after this one need it back
    monkeypatch.setattr(run_dir, "FREE_SPACE_FACTOR", run_dir.FREE_SPACE_FACTOR)

    args = argparse.Namespace(size="toy", prompt=60, answer=6, pairs=2, steps=2)
    shared, separate = bench_dpo.run_nemo(args, shared=True), bench_dpo.run_nemo(args, shared=False)
    for row in (shared, separate):
        assert row["pairs_per_s"] > 0 and row["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert shared["tokens_per_pair"] < separate["tokens_per_pair"]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    trl = bench_dpo.run_trl(args, precompute=False)
    assert trl["pairs_per_s"] > 0 and trl["padding_free_ran"] in (True, False)
    assert list(tmp_path.iterdir()) == []  # TRL's output directory is removed, not left in the temp folder
