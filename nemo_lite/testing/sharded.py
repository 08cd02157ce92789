"""Sharded checkpoints under a real process group, without torchrun's start-up per case: a pool of gloo
ranks that runs one task at a time on every rank (tests/test_sharded_checkpoint.py)."""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from nemo_lite.testing.net import free_port

LAYOUT = {"model.dim": 16, "data.seq_len": 8}
STAGES = ["tmp", "dcp", "rank files", "manifest", "renamed"]


class Killed(Exception):
    """Every rank dying at one stage of a save."""


def _worker(rank: int, world: int, port: int, tasks, results) -> None:
    import torch.distributed as dist

    from nemo_lite.training.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    info = DistInfo(rank, world, rank)
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(info, *args)))
        except Exception as err:  # noqa: BLE001 - reported to the test as the rank's outcome
            results.put((rank, False, (type(err).__name__, str(err), traceback.format_exc())))
    dist.destroy_process_group()


class RankPool:
    """``world`` processes in one gloo group; ``run(fn, *args)`` calls ``fn(info, *args)`` on each, returns
    [(ok, value)] by rank (value: the result, or (exception type name, message, traceback))."""

    def __init__(self, world: int = 2) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        self.world = world
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.procs = [
            ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args: Any, timeout: float = 120) -> list[tuple[bool, Any]]:
        for q in self.tasks:
            q.put((fn, args))
        out: dict[int, tuple[bool, Any]] = {}
        for _ in range(self.world):
            rank, ok, value = self.results.get(timeout=timeout)  # a hang fails the test instead of blocking it
            out[rank] = (ok, value)
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _model_and_optimizer(info):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    mesh = init_device_mesh("cpu", (info.world_size,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _full_state(model, optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    out = {f"model.{k}": v.clone() for k, v in model_sd.items()}
    for name, state in optim_sd.get("state", {}).items():
        out |= {f"optim.{name}.{k}": torch.as_tensor(v).clone() for k, v in state.items()}
    return out


def train(info, root: str, steps: int, keep_last: int, kill: tuple[int, str] | None = None, first: int = 1):
    """Train the tiny model ``steps`` steps from ``first``, saving each; returns the full state after each
    step (rank 0). ``kill=(step, stage)``: every rank raises Killed at that stage of that step's save."""
    from nemo_lite.training import distributed

    model, optimizer = _model_and_optimizer(info)
    states = {}
    current = {"step": 0}

    def reached(stage: str) -> None:
        if kill is not None and (current["step"], stage) == tuple(kill):
            raise Killed(f"killed at {stage} of step {current['step']}")

    distributed._reached, before = reached, distributed._reached
    try:
        for step in range(first, first + steps):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(4, 8, generator=gen)[info.rank * 2 : info.rank * 2 + 2]
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            states[step] = _full_state(model, optimizer)
            current["step"] = step
            distributed.save_sharded(Path(root), step, model, optimizer, {"step": step}, info, keep_last, layout=LAYOUT)
    finally:
        distributed._reached = before
    return states if info.rank == 0 else None


def resume(info, root: str, layout: dict[str, Any] | None = None):
    """What a resume does (Trainer._resume): the newest checkpoint, or when it is damaged the one before.
    Returns (step loaded, full state, fallback messages) or raises the one-line refusal."""
    from nemo_lite.training import checkpoint as ckpt
    from nemo_lite.training import distributed

    model, optimizer = _model_and_optimizer(info)
    found = ckpt.list_checkpoints(Path(root))
    notes = []
    for path in reversed(found):
        try:
            extra = distributed.load_checkpoint_any(path, model, optimizer, info, layout=layout or LAYOUT)
        except ckpt.CheckpointDamagedError as err:
            notes.append(f"{path.name}: {err}")
            continue
        state = _full_state(model, optimizer)  # a collective: every rank gathers, rank 0 returns it
        return int(extra["step"]), state if info.rank == 0 else None, notes
    return None, None, notes


def load(info, path: str):
    """load_checkpoint_any with the arguments every version of it takes."""
    from nemo_lite.training import distributed

    model, optimizer = _model_and_optimizer(info)
    return distributed.load_checkpoint_any(Path(path), model, optimizer, info)["step"]


def marker_pickle(marker: str) -> bytes:
    """Bytes whose unpickling creates the directory ``marker``: what a tampered .metadata could run."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (marker,))

    return pickle.dumps(Payload())
