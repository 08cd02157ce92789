"""Run under torchrun on the CPU (gloo) by tests/test_moe_distributed.py: a tiny Qwen3-MoE sharded by its
family's FSDP2 plan, against the same model unsharded in each process on the whole batch.

    python -m torch.distributed.run --nproc-per-node 2 -m nemo_lite.testing.moe_fsdp OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json``: the local and global shapes and placements of the expert weights,
the largest relative gradient difference (every parameter, routers and experts included) and the loss
difference, with the load-balancing loss in the objective.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_lite.components.models import get_model_family, get_preset

SHAPE = dict(
    vocab_size=64,
    hidden_size=24,
    intermediate_size=40,
    moe_intermediate_size=12,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=6,
    num_experts=5,  # not a multiple of 2 ranks: FSDP2 pads the last shard
    num_experts_per_tok=2,
    mlp_only_layers=[1],
    output_router_logits=True,
    router_aux_loss_coef=0.1,
    eos_token_id=1,
)


def objective(model, ids: torch.Tensor) -> torch.Tensor:
    hidden = model.forward_hidden(ids[:, :-1])
    logits = torch.nn.functional.linear(hidden, model.output_weight)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return loss + model.auxiliary().loss


def main(out_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    family = get_model_family("qwen3_moe")
    config = get_preset("qwen3-30b-a3b", **SHAPE)
    reference = family.build(config)
    reference.init_weights(seed=0)
    sharded = family.build(config)
    sharded.load_state_dict(reference.state_dict())
    family.shard(sharded)
    ids = torch.randint(2, config.vocab_size, (2 * world, 9), generator=torch.Generator().manual_seed(0))
    # The load-balancing loss is not linear in the batch: each rank's is its own batch's (as transformers
    # under data parallelism), so the reference sums the ranks' objectives over their own rows.
    rows = ids.chunk(world)
    reference_loss = sum(objective(reference, r) for r in rows) / world
    reference_loss.backward()
    loss = objective(sharded, rows[rank])
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    worst = 0.0
    for p, q in zip(sharded.parameters(), reference.parameters(), strict=True):
        grad = p.grad.full_tensor()
        worst = max(worst, ((grad - q.grad).norm() / q.grad.norm().clamp(min=1e-12)).item())
    experts = sharded.layers[0].mlp.experts.gate_up_proj
    assert isinstance(experts, DTensor)
    result = {
        "local_shape": list(experts.to_local().shape),
        "global_shape": list(experts.shape),
        "placements": [f"Shard({p.dim})" if p.is_shard() else str(p) for p in experts.placements],
        "grad_rel_diff": worst,
        "loss_diff": abs(total.item() / world - reference_loss.item()),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
