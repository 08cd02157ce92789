"""peft.quantize_base=nf4 under torchrun on CPU (gloo): FSDP2 shards torchao's NF4 weights (its all-gather of the
4-bit data) and the run gives the losses of one process with the same global batch, and resumes exactly from its
sharded checkpoint (the base quantized again from disk on each rank)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("torchao")

from test_lora import write_base as write_llama  # noqa: E402
from test_lora_distributed import launch, losses  # noqa: E402


def write_base(path: Path) -> Path:
    """A random transformers Llama whose every block linear splits into two row shards of whole NF4 groups."""
    return write_llama(path, hidden_size=256, intermediate_size=512, num_key_value_heads=4)


@pytest.mark.slow
def test_fsdp2_shards_the_nf4_base_and_resumes_exactly(tmp_path):
    base = write_base(tmp_path / "base")
    quantized = ["peft.quantize_base=nf4", "trainer.export_hf=false"]
    single = launch(1, base, *quantized, "data.batch_size=4", f"run_dir={tmp_path}/single")
    assert single.returncode == 0, single.stderr[-2000:]
    assert "base linears in NF4 (torchao, from float32): 14" in single.stderr
    double = launch(2, base, *quantized, "data.batch_size=2", f"run_dir={tmp_path}/double")
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "double")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5

    ckpt = tmp_path / "double" / "checkpoints" / "step_000002"
    resumed = launch(2, base, *quantized, "data.batch_size=2", f"run_dir={tmp_path}/resumed", f"trainer.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(tmp_path / "resumed") == two[2:]
