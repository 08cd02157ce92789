"""Data-parallel training under torchrun: process group, FSDP2 sharding, sharded checkpoints.

One process per GPU (``torchrun --nproc-per-node N recipes/pretrain.py ...``); without torchrun's
environment nothing here runs and training is single-process. The model family says how its model is
sharded (``ModelFamily.shard``: for Llama one ``fully_shard`` unit per decoder block, then the root).
Checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shards) into a temporary
directory that rank 0 renames once every rank has finished.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join torchrun's process group if its environment is set (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank, world_size, local_rank)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_model(family, model: torch.nn.Module, *, bf16: bool, reshard_after_forward: bool = True) -> None:
    """FSDP2 by the model family's plan, computing in bf16 and reducing gradients in float32 on GPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    family.shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view of its storage); any other tensor as it is."""
    return getattr(tensor, "_local_tensor", tensor)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_str(value: str) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dict(model: torch.nn.Module, *, only_trainable: bool = False) -> dict[str, torch.Tensor]:
    """Unsharded float32 weights on CPU (a collective: every rank calls it; rank 0 gets them all);
    ``only_trainable``: without the frozen parameters (a LoRA run's adapters only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=only_trainable)
    return get_model_state_dict(model, options=options)


# ---- sharded checkpoints ---------------------------------------------------------------------------


def save_sharded(
    ckpt_root: Path,
    step: int,
    model,
    optimizer,
    extra_per_rank: dict[str, Any],
    info: DistInfo,
    keep_last: int,
    *,
    only_trainable: bool = False,
) -> Path:
    """Model and optimizer through DCP (sharded), per-rank extras (data, RNG) beside them.
    ``only_trainable``: the frozen parameters are left out (a LoRA run saves its adapters only)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from nemo_lite.training.checkpoint import TMP_PREFIX, list_checkpoints

    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"{TMP_PREFIX}{final.name}"
    if info.rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    options = StateDictOptions(ignore_frozen_params=only_trainable)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(extra_per_rank, tmp / f"rank{info.rank:05d}.pt")
    dist.barrier()
    if info.rank == 0:
        (tmp / "meta.json").write_text(f'{{"step": {step}, "world_size": {info.world_size}, "format": "dcp"}}')
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_sharded(path: Path, model, optimizer, info: DistInfo, *, only_trainable: bool = False) -> dict[str, Any]:
    """Load what :func:`save_sharded` wrote; every tensor asked for must be in the checkpoint (with
    ``only_trainable`` the frozen ones are not asked for)."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format") != "dcp":
        raise ValueError(
            f"{path} is a single-process checkpoint; resume it without torchrun, or start this "
            f"{info.world_size}-rank run fresh"
        )
    if meta["world_size"] != info.world_size:
        raise ValueError(
            f"{path} was saved by {meta['world_size']} ranks and this run has {info.world_size}: resume with "
            f"--nproc-per-node {meta['world_size']} (the data-loader state is per rank)"
        )
    options = StateDictOptions(ignore_frozen_params=only_trainable, strict=not only_trainable)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    return torch.load(path / f"rank{info.rank:05d}.pt", weights_only=True)
