"""scripts/bench_adapters.py at toy size on a CPU: every nemo_lite row and the transformers + PEFT row run from the
same checkpoint and batches and record what the figures need; the bitsandbytes baseline, which needs CUDA, is
recorded as skipped with the reason."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("torchao")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_the_toy_run_records_every_adapter_row_and_skips_the_cuda_baseline(tmp_path, monkeypatch):
    import bench_adapters

    from nemo_lite.training import run_dir

    # the benchmark turns the free-space check off for its process; the tests after this one need it back
    monkeypatch.setattr(run_dir, "FREE_SPACE_FACTOR", run_dir.FREE_SPACE_FACTOR)
    out = tmp_path / "adapters.json"
    argv = ["bench_adapters.py", "--shape", "toy", "--steps", "3", "--ckpt-dir", str(tmp_path / "ckpt")]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    bench_adapters.main()
    rows = {r["config"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["nemo-lora", "nemo-full", "nemo-qlora", "hf-peft", "hf-bnb-qlora"]
    for name in ("nemo-lora", "nemo-full", "nemo-qlora", "hf-peft"):
        assert "error" not in rows[name], rows[name]
        assert math.isfinite(rows[name]["last_loss"]) and rows[name]["tokens_per_s"] > 0
        assert rows[name]["tokens_per_step"] == 2 * 128

    # r=16 on q, k, v, o, gate, up, down of 2 blocks of the toy shape (hidden 256, MLP 512, 4 KV heads of 64)
    adapters = 2 * 16 * ((256 + 256) * 4 + (256 + 512) * 3)
    lora, full, qlora, peft = rows["nemo-lora"], rows["nemo-full"], rows["nemo-qlora"], rows["hf-peft"]
    assert lora["trainable_params"] == qlora["trainable_params"] == peft["trainable_params"] == adapters
    assert full["trainable_params"] == full["params"]
    assert "base linears in NF4" in qlora["converters"][0] and "NF4" not in lora["converters"][0]
    # B starts at zero: the first loss is the base model's, the same for nemo_lite and PEFT (float32 on a CPU),
    # and NF4's rounding of the base moves it a little
    assert lora["first_loss"] == pytest.approx(peft["first_loss"], rel=1e-5)
    assert lora["first_loss"] == pytest.approx(full["first_loss"], rel=1e-6)
    assert 0 < abs(qlora["first_loss"] - lora["first_loss"]) < 0.05

    bnb = rows["hf-bnb-qlora"]
    assert bnb == {"config": "hf-bnb-qlora", "skipped": bnb["skipped"], "seconds": bnb["seconds"]}
    assert bnb["skipped"] in ("bitsandbytes not importable", "needs a CUDA GPU")
