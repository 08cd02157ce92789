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


def test_the_pretrain_recipe_trains_a_qwen3_moe_on_two_ranks_as_on_one(tmp_path):
    """torchrun, 2 ranks x 2 rows against 1 process x 4 rows: the same token losses (the router loss is off, as
    in the released configs, so the objective is linear in the batch), and the router metrics logged."""
    from test_distributed import launch

    from nemo_lite.training.metrics import read_metrics

    shape = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2)
    shape |= dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2)
    args = ["model=qwen3-30b-a3b", "model.pretrained_path=null", "model.vocab_from_tokenizer=true"]
    args += [f"+model.overrides.{key}={value}" for key, value in shape.items()]
    args += ["+model.overrides.mlp_only_layers=[1]", "trainer.save_every=0", "trainer.val_every=0"]
    args += ["trainer.sample_tokens=0", "trainer.max_steps=3"]
    runs = {}
    for nproc, batch in ((1, 4), (2, 2)):
        done = launch(nproc, *args, f"data.batch_size={batch}", f"run_dir={tmp_path / str(nproc)}")
        assert done.returncode == 0, done.stderr[-3000:]
        runs[nproc] = read_metrics(tmp_path / str(nproc))
    assert len(runs[1]) == len(runs[2]) == 3
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(runs[1], runs[2], strict=True)) <= 1e-5
    assert all(r["expert_load_imbalance"] >= 1.0 and r["aux_loss"] > 0 for r in runs[2])
