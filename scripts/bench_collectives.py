"""NCCL bandwidth at the message sizes FSDP2 uses for one Llama-3.2-1B decoder block.

    torchrun --nproc-per-node 2 scripts/bench_collectives.py [--iters 20]

Per block and step FSDP2 all-gathers the bf16 parameters (60.8 M, 122 MB gathered) and
reduce-scatters the float32 gradients (243 MB in). Prints the median time of each (CUDA events around
every call) and NCCL's bus bandwidth (the figure nccl-tests reports), on an otherwise idle GPU. Run it
again with NCCL_PROTO=Simple (or other NCCL variables) set to compare protocols.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
from bench_utils import cuda_time_ms, meta

BLOCK_PARAMS = 60_821_504  # one decoder block of the 1B shape (4 projections, 3 MLP matrices, 2 norms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    n = BLOCK_PARAMS - BLOCK_PARAMS % world
    gathered = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    shard_bf16 = torch.randn(n // world, device="cuda").bfloat16()
    grads = torch.randn(n, device="cuda")
    shard_f32 = torch.empty(n // world, device="cuda")
    ag = cuda_time_ms(lambda: dist.all_gather_into_tensor(gathered, shard_bf16), args.iters)
    rs = cuda_time_ms(lambda: dist.reduce_scatter_tensor(shard_f32, grads), args.iters)
    factor = (world - 1) / world  # bus bandwidth of a ring all-gather / reduce-scatter
    result = {
        **meta(),
        "world_size": world,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")},
        "all_gather_bf16_ms": ag,
        "all_gather_busbw_gb_s": gathered.numel() * 2 * factor / ag / 1e6,
        "reduce_scatter_f32_ms": rs,
        "reduce_scatter_busbw_gb_s": grads.numel() * 4 * factor / rs / 1e6,
    }
    if rank == 0:
        print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
