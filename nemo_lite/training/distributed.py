"""Data-parallel training under torchrun: process group, device mesh, FSDP2 sharding, checkpoints.

One process per GPU (``torchrun --nproc-per-node N recipes/pretrain.py ...``); without torchrun's
environment nothing here runs and training is single-process. The model family says how its model is
sharded (``ModelFamily.shard``: for Llama one ``fully_shard`` unit per decoder block, then the root).

The data-parallel mesh is ``(replicate, shard)`` (``trainer.dp_replicate`` x the rest): FSDP2 shards
each parameter over the ranks of one ``shard`` group (normally the GPUs of one node) and keeps
``dp_replicate`` copies of those shards, whose gradients it all-reduces (torch's HSDP). With
``dp_replicate=1`` it is plain FSDP over every rank. Every rank is a data-parallel rank either way.

Checkpoints go through ``torch.distributed.checkpoint`` (each rank writes its shards) into a temporary
directory that rank 0 renames once every rank has finished and the manifest (every file's size and CRC-32,
nemo_lite.training.sharded_checkpoint) is written; loading checks the manifest first.
Any checkpoint resumes on any number of ranks (:func:`load_checkpoint_any`): DCP reshards, and a
single-process checkpoint is broadcast from rank 0 and sharded.
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


def check_dp_replicate(dp_replicate: int, world_size: int) -> None:
    """``trainer.dp_replicate`` must split the ranks into equal shard groups."""
    from nemo_lite.errors import ConfigError

    if dp_replicate < 1 or world_size % dp_replicate:
        raise ConfigError(
            f"trainer.dp_replicate={dp_replicate} must divide the number of ranks, {world_size} (it is the number "
            "of nodes for HSDP, each node's GPUs forming one shard group; 1 = FSDP over all ranks)"
        )


def build_mesh(info: DistInfo, dp_replicate: int, device_type: str):
    """The data-parallel DeviceMesh: 1-D ``("shard",)`` over every rank for FSDP, or 2-D
    ``("replicate", "shard")`` for HSDP, whose rows are consecutive ranks (torchrun numbers a node's
    ranks consecutively, so a shard group is one node)."""
    from torch.distributed.device_mesh import init_device_mesh

    check_dp_replicate(dp_replicate, info.world_size)
    if dp_replicate == 1:
        return init_device_mesh(device_type, (info.world_size,), mesh_dim_names=("shard",))
    shape = (dp_replicate, info.world_size // dp_replicate)
    return init_device_mesh(device_type, shape, mesh_dim_names=("replicate", "shard"))


def shard_model(
    family, model: torch.nn.Module, *, bf16: bool, reshard_after_forward: bool = True, mesh=None, prefetch: int = 0
) -> None:
    """FSDP2 (HSDP on a 2-D mesh) by the model family's plan, computing in bf16 and reducing gradients in
    float32 on GPU. ``prefetch`` > 0: each block starts the all-gather of the next ``prefetch`` blocks when
    its forward starts (and of the previous ones in backward), rather than when the host reaches them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh} if mesh is not None else {}
    family.shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward, **kwargs)
    if prefetch > 0:
        blocks = list(family.blocks(model))
        model.set_modules_to_forward_prefetch(blocks[:prefetch])  # the root runs first: gather block 0 with it
        for i, block in enumerate(blocks):
            block.set_modules_to_forward_prefetch(blocks[i + 1 : i + 1 + prefetch])
            block.set_modules_to_backward_prefetch(blocks[max(0, i - prefetch) : i][::-1])


def squared_norm_share(grad_norm: torch.Tensor, mesh) -> torch.Tensor:
    """This rank's part of the global squared gradient norm, for a sum over every rank: its shards' squared
    norm. Under HSDP the replicas hold equal gradients, so only the first replica's shards count (the others
    send 0, times their norm so that a non-finite norm stays non-finite)."""
    squared = grad_norm.float().square()
    if mesh is None or mesh.ndim == 1 or mesh.get_local_rank("replicate") == 0:
        return squared
    return squared * 0.0


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


def _reached(stage: str) -> None:
    """Called on every rank at each stage of a sharded save, where no collective is half done (a test
    kills the save there: nemo_lite.testing.sharded)."""


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
    layout: dict[str, Any] | None = None,
) -> Path:
    """Model and optimizer through DCP (sharded), per-rank extras (data, RNG) beside them, and meta.json: every
    file's size and CRC-32 and the run's ``layout`` (see nemo_lite.training.sharded_checkpoint). Written into a
    temporary directory renamed into place, then the checkpoints up to this step are pruned to ``keep_last``.
    ``only_trainable``: the frozen parameters are left out (a LoRA run saves its adapters only)."""
    import json
    import time

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from nemo_lite.components.models.hf import share_modes
    from nemo_lite.training import checkpoint as ckpt
    from nemo_lite.training.sharded_checkpoint import owned_files

    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"{ckpt.TMP_PREFIX}{final.name}"
    if info.rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    _reached("tmp")
    options = StateDictOptions(ignore_frozen_params=only_trainable)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    _reached("dcp")
    rank_file = tmp / f"rank{info.rank:05d}.pt"
    torch.save(extra_per_rank, rank_file)
    ckpt._fsync_file(rank_file)
    dist.barrier()  # every file is written: each rank checksums its own
    _reached("rank files")
    mine = {name: ckpt.file_record(tmp / name) for name in owned_files(tmp, info.rank, info.world_size)}
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, mine)
    if info.rank == 0:
        files = {name: record for part in gathered for name, record in part.items()}
        meta = {
            "step": step,
            "world_size": info.world_size,
            "format": "dcp",
            "time": time.time(),
            "files": dict(sorted(files.items())),
            "layout": layout or {},
        }
        (tmp / ckpt.META_FILE).write_text(json.dumps(meta))
        ckpt._fsync_file(tmp / ckpt.META_FILE)
        share_modes(tmp)
        ckpt._fsync_dir(tmp)
    dist.barrier()
    _reached("manifest")
    if info.rank == 0:
        if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave it missing
            old = ckpt_root / f"{ckpt.TMP_PREFIX}old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        ckpt._fsync_dir(ckpt_root)
    dist.barrier()
    _reached("renamed")
    if info.rank == 0:
        # As for single-process checkpoints: only those up to this step are pruned, never a later one (left by
        # the run this one resumed from an earlier checkpoint of).
        for old in [p for p in ckpt.list_checkpoints(ckpt_root) if ckpt.step_of(p) <= step][:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def verify_any(path: Path, info: DistInfo, layout: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a checkpoint of any kind before anything of it is read: every file against its meta.json (size,
    CRC-32) and its layout against this run's ``layout``. Rank 0 checks and sends its verdict, so every rank
    raises the same CheckpointDamagedError or ResumeError, or none. Returns the meta."""
    from nemo_lite.training import checkpoint as ckpt
    from nemo_lite.training.sharded_checkpoint import check_layout, verify_sharded

    verdict: tuple[str, str] | None = None
    meta: dict[str, Any] = {}
    if info.rank == 0:
        try:
            meta = verify_sharded(path) if ckpt.is_sharded(path) else ckpt.verify_checkpoint(path)
            check_layout(path, meta, layout, info.world_size)
        except (ckpt.CheckpointDamagedError, ckpt.ResumeError) as err:
            verdict = (type(err).__name__, str(err))
        except Exception as err:  # noqa: BLE001 - still sent: the other ranks wait in the broadcast
            verdict = ("RuntimeError", f"checking {path} failed: {type(err).__name__}: {err}")
    if info.enabled:
        box = [(verdict, meta)]
        dist.broadcast_object_list(box, src=0)
        verdict, meta = box[0]
    if verdict is not None:
        kind = RuntimeError if verdict[0] == "RuntimeError" else getattr(ckpt, verdict[0])
        raise kind(verdict[1])
    return meta


def load_checkpoint_any(
    path: Path,
    model,
    optimizer,
    info: DistInfo,
    *,
    only_trainable: bool = False,
    layout: dict[str, Any] | None = None,
    verified: bool = False,
) -> dict[str, Any]:
    """Load a checkpoint written by any number of ranks into this run's model and optimizer (sharded under
    torchrun, plain in one process) and return its train state (step, scheduler, data, RNG). It is first
    checked with :func:`verify_any` (``layout``: this run's), unless the caller did (``verified``).

    - sharded (DCP) checkpoint: ``torch.distributed.checkpoint`` reads each tensor's region this run needs,
      whatever the mesh that wrote it (one process reads whole tensors);
    - single-process checkpoint under torchrun: rank 0 reads the weights and optimizer state, torch
      broadcasts them and each rank keeps its shards.

    The data-loader state counts global rows and is the same on every rank, so it holds for any rank count
    (docs/distributed.md, Resharding). RNG states are per rank: rank r takes the one of rank r mod N.
    """
    from nemo_lite.training.checkpoint import is_sharded, read_meta

    meta = read_meta(path) if verified else verify_any(path, info, layout)
    if is_sharded(path):
        _load_dcp(path / "dcp", model, optimizer, only_trainable=only_trainable)
        extra = torch.load(path / f"rank{info.rank % int(meta['world_size']):05d}.pt", weights_only=True)
        return extra
    if not info.enabled:
        raise ValueError(f"{path} is a single-process checkpoint: load it with nemo_lite.training.checkpoint")
    if only_trainable:
        raise ValueError(
            f"{path} is a LoRA run's single-process checkpoint: resume it in one process (without torchrun); "
            "moving adapters from one process to several ranks is not supported"
        )
    return _load_full_into_shards(path, model, optimizer, info)


def _load_dcp(dcp_dir: Path, model, optimizer, *, only_trainable: bool = False) -> None:
    """DCP into this run's state dicts, through the reader and planner that never unpickle untrusted bytes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from nemo_lite.training import checkpoint as ckpt
    from nemo_lite.training.sharded_checkpoint import SafePlanner, SafeReader

    options = StateDictOptions(ignore_frozen_params=only_trainable, strict=not only_trainable)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)  # this run's layout: DCP fills it
    state = {"model": model_sd, "optimizer": optim_sd}
    reader = SafeReader(str(dcp_dir))
    reader.read_metadata()  # refused here, in one line, before DCP's own error handling sees it
    # One process (no process group) reads the whole tensors from the shards.
    try:
        dcp.load(state, storage_reader=reader, planner=SafePlanner(), no_dist=not dist.is_initialized())
    except CheckpointException as err:  # the same on every rank: DCP gathers each rank's failure
        first = next(iter(err.failures.values()), err)
        first = first[0] if isinstance(first, tuple) else first  # (exception, its frames)
        raise ckpt.ResumeError(
            f"cannot resume from {dcp_dir.parent}: its shards do not fit this model "
            f"({ckpt._first_line(first, 300)}); resume with the model it was saved "
            "with, or start fresh in another run_dir"
        ) from None
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )


def _load_full_into_shards(path: Path, model, optimizer, info: DistInfo) -> dict[str, Any]:
    """A single-process checkpoint (safetensors + train_state.pt) into FSDP2-sharded modules.

    Only rank 0 reads the tensors; ``train_state.pt`` is memory-mapped, so the other ranks read just its small
    entries. The optimizer state is keyed by parameter index there; the FQN of each index comes from this
    run's optimizer, whose groups are built the same way (``optim.param_groups``) from the same model."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from nemo_lite.training.checkpoint import MODEL_FILE, STATE_FILE

    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
    saved_optim = state.pop("optimizer")
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    if info.rank == 0:
        model_sd = load_file(str(path / MODEL_FILE))
        optim_sd = _optimizer_state_by_name(model, optimizer, saved_optim)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, model_sd, options=options)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=options)
    return state


def _optimizer_state_by_name(model, optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """``optimizer.state_dict()`` (keyed by parameter index) keyed by parameter name, as torch's
    ``set_optimizer_state_dict`` takes a full state dict."""
    names = {id(p): name for name, p in model.named_parameters()}
    current = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_ids = [i for group in saved["param_groups"] for i in group["params"]]
    if len(saved_ids) != len(current):
        raise ValueError(
            f"the checkpoint's optimizer has {len(saved_ids)} parameters and this model {len(current)}: "
            "not a checkpoint of this model"
        )
    fqn = dict(zip(saved_ids, current, strict=True))
    return {
        "state": {fqn[i]: dict(s) for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in saved["param_groups"]],
    }
