"""Float8 under FSDP2 on CPU (gloo, torchao's emulation): with tensorwise the converted weights are
all-gathered in float8, and 2 ranks give the losses of 1 process with the same global batch; the sharded
checkpoint resumes exactly, and the export is the plain float32 model under its own names.

"The same losses" is up to the order of the sums: 2 ranks add their rows' products in another order than one
process (and a GEMM's order depends on its thread count and the CPU's kernels). Float8 rounding magnifies such
last-bit differences, since a value on a rounding boundary moves by a whole float8 step, by an amount that
depends on the machine; so the bound is measured on the machine the test runs on: one process against itself
with the rows in another order and with another thread count, the same sums in other orders.

Run as a script under torchrun (``__main__`` below), the file is one rank of such a run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_lite.testing.data import SyntheticPackedLoader
from nemo_lite.testing.net import free_port
from nemo_lite.training.config import RecipeConfig
from nemo_lite.training.metrics import read_metrics

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed"),
]
REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS = 4, 6
# The least bound on 2 ranks against 1 process: a few float32 steps of a loss near ln(512).
LOSS_ATOL = 1e-5
# How far the reduction order moves the losses on this machine (see above); beyond this the comparison
# could no longer tell a wrong scale or a wrong loss scaling from rounding, and the test says so.
NOISE_LIMIT = 5e-4


def config(run_dir: str, world_size: int, resume: str | None = None) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.run_dir = run_dir
    cfg.model.preset = "tiny"
    cfg.model.vocab_from_tokenizer = False
    cfg.model.overrides = {"intermediate_size": 1040, "vocab_size": 512, "eos_token_id": 3}  # up/gate convert
    cfg.attention.backend = "sdpa"
    cfg.data.seq_len, cfg.data.batch_size = 64, GLOBAL_BATCH // world_size
    cfg.float8.enabled = True
    t = cfg.trainer
    t.device, t.step_impl = "cpu", "fast"
    t.max_steps, t.save_every, t.val_every, t.keep_last = STEPS, 3, 0, 3
    t.sample_tokens, t.progress_bar = 0, False
    if resume:
        t.resume = resume
    return cfg


class RankLoader(SyntheticPackedLoader):
    """One rank's rows (every world_size-th) of a global batch in which each row appears twice, side by side:
    on 2 ranks each holds one copy of every row, so its tensorwise activation scales (the amax of what it
    holds) are those of the whole batch in one process, and float8 rounds the same values the same way."""

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__(GLOBAL_BATCH // 2, 64, vocab_size=512, eos_id=3, mean_doc=20, seed=1, learnable=True)
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        for batch in super().__iter__():
            yield {k: v.repeat_interleave(2, dim=0)[self.rank :: self.world_size] for k, v in batch.items()}


class ReorderedLoader(RankLoader):
    """RankLoader's global batch in one process with the copies of the rows in another order ([a, b, a, b]
    instead of [a, a, b, b]): the same losses, summed in another order."""

    def __iter__(self):
        for batch in SyntheticPackedLoader.__iter__(self):
            yield {k: v.repeat(2, 1) for k, v in batch.items()}


def emulated_converters(cfg: RecipeConfig, **kwargs) -> list:
    """The trainer's converters with torchao's emulation, so that a CPU runs the float8 path."""
    from nemo_lite.training.converters.float8 import Float8Converter

    return [Float8Converter(cfg.float8, emulate=True)]


def trainer_for(cfg: RecipeConfig, dist_info=None, loader=RankLoader):
    from nemo_lite.training.trainer import DistInfo, Trainer

    info = dist_info or DistInfo()
    return Trainer(cfg, dist_info=dist_info, train_loader=loader(info.rank, info.world_size))


def one_process(run_dir: Path, *, threads: int, loader=RankLoader):
    """The global batch in this process, at ``threads`` threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return trainer_for(config(str(run_dir), 1), loader=loader).fit()
    finally:
        torch.set_num_threads(saved)


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def launch(run_dir: Path, resume: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += [__file__, str(run_dir), resume or ""]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_fsdp2_with_float8_all_gather_matches_one_process_and_resumes_exactly(tmp_path, monkeypatch):
    two = launch(tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FSDP2 all-gathers the converted weights in float8" in two.stderr
    assert "weight type: DTensor(WeightWithDynamicFloat8CastTensor)" in two.stdout  # the float8 all-gather is on
    from nemo_lite.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "build_converters", emulated_converters)
    # torchrun runs each rank at one thread (OMP_NUM_THREADS=1): so does the reference.
    one = one_process(tmp_path / "one", threads=1)
    noise = max(
        max_difference(one_process(tmp_path / "reordered", threads=1, loader=ReorderedLoader).losses, one.losses),
        max_difference(one_process(tmp_path / "threads", threads=max(2, torch.get_num_threads())).losses, one.losses),
    )
    assert noise <= NOISE_LIMIT, f"the order of the sums alone moves the losses by {noise:.2e} on this machine"
    got = [r["loss"] for r in read_metrics(tmp_path / "two")]
    # Two ranks change the order in several places at once (each rank's GEMMs, then the reduce-scatter), each
    # about as much as one reordering: a few times the measured movement.
    assert max_difference(got, one.losses) <= max(LOSS_ATOL, 4 * noise)

    resumed = launch(tmp_path / "resumed", str(tmp_path / "two" / "checkpoints" / "step_000003"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == got[3:]

    from safetensors import safe_open

    name = "model.safetensors"
    with safe_open(str(tmp_path / "two/hf" / name), "pt") as a, safe_open(str(one.hf_dir / name), "pt") as b:
        keys = sorted(a.keys())
        assert keys == sorted(b.keys())
        for key in keys:
            ours = a.get_tensor(key)
            assert type(ours) is torch.Tensor and ours.dtype == torch.float32, key
            torch.testing.assert_close(ours, b.get_tensor(key), rtol=0, atol=1e-4)  # Adam amplifies the last bits


if __name__ == "__main__":  # one rank of the torchrun launched above
    from nemo_lite.training import distributed
    from nemo_lite.training import trainer as trainer_module

    trainer_module.build_converters = emulated_converters
    info = distributed.init_distributed()
    run_dir, resume = sys.argv[1], sys.argv[2] or None
    trainer = trainer_for(config(run_dir, info.world_size, resume), dist_info=info)
    trainer.fit()
    weight = trainer.model.layers[0].mlp.up_proj.weight
    if info.rank == 0:
        inner = type(getattr(weight, "_local_tensor", weight)).__name__
        print(f"weight type: {type(weight).__name__}({inner})")
    distributed.shutdown()
