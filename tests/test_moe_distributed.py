"""FSDP2 on a mixture of experts, 2 processes on the CPU (gloo): the stacked expert weights are sharded on their
expert dimension, and one backward gives the gradients of the unsharded model (nemo_lite/testing/moe_fsdp.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from test_distributed import REPO, clean_env, free_port


def test_fsdp2_shards_the_experts_and_gives_the_unsharded_gradients(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    done = subprocess.run(
        [*cmd, "-m", "nemo_lite.testing.moe_fsdp", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["global_shape"] == [5, 24, 24] and result["placements"] == ["Shard(0)"]
        assert result["local_shape"] == [[3, 24, 24], [2, 24, 24]][rank]  # 5 experts over 2 ranks
        assert result["grad_rel_diff"] <= 1e-5 and result["loss_diff"] <= 1e-6
