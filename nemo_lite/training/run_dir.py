"""A run owns its run directory: a lock, and the checks made before any data or model is built.

    lock = RunLock(run_dir)          # refuses a second run on the same directory (names its pid)
    check_writable(run_dir, need_bytes=3 * checkpoint_bytes(n_params))
    moved = claim_for_fresh_run(run_dir, resume=False, overwrite=False)   # refuses to bury older checkpoints

The lock is ``fcntl.flock`` on ``<run_dir>/.lock``: the kernel drops it when its process dies, however it
dies, so a crash never leaves a stale lock behind. Under torchrun rank 0 holds it for the whole job.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from nemo_lite.errors import ConfigError, NemoLiteError

LOCK_FILE = ".lock"
# Training state per parameter, float32: the weights and AdamW's two moments.
CHECKPOINT_BYTES_PER_PARAM = 12
# Memory per parameter while training, float32: weights, gradient and two moments.
TRAINING_BYTES_PER_PARAM = 16
# Free space asked for: a new checkpoint is written before the oldest kept one is removed.
FREE_SPACE_FACTOR = 3


class RunDirError(NemoLiteError):
    """The run directory cannot be used as asked (the message says why and what to do)."""


def host() -> str:
    return socket.gethostname()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# run_dir (resolved) -> [descriptor, holders]: one process may build several trainers on one run_dir
# (a flock is per open file, so a second one here would refuse its own process).
_HELD: dict[str, list[int]] = {}


class RunLock:
    """An exclusive lock on ``run_dir`` for this process's lifetime (or until :meth:`release`). Another
    process asking for it gets a RunDirError naming the holder's pid."""

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        self.key: str | None = os.path.realpath(run_dir)
        if self.key in _HELD:
            _HELD[self.key][1] += 1
            return
        path = Path(run_dir) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").split()
            os.close(fd)
            self.key = None
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunDirError(
                f"run_dir {run_dir} is in use by another run ({who}); wait for it to finish, or choose another run_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {host()}\n".encode())
        _HELD[self.key] = [fd, 1]

    def release(self) -> None:
        if self.key is None or self.key not in _HELD:
            return
        held = _HELD[self.key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            os.close(held[0])  # closing the descriptor drops the flock
        self.key = None


def check_writable(run_dir: Path, need_bytes: int) -> None:
    """``run_dir`` is (or can be made) a writable directory with at least ``need_bytes`` free."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} is a file, not a directory: choose another run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir {run_dir} is not writable ({err.strerror}): choose another run_dir") from None
    check_free_space(run_dir, need_bytes)


def check_free_space(run_dir: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise RunDirError(
            f"run_dir {run_dir} has {human_bytes(free)} free; the checkpoints need about {human_bytes(need_bytes)} "
            f"({FREE_SPACE_FACTOR} x one checkpoint): free some space or choose another run_dir"
        )


def checkpoint_bytes(n_params: int) -> int:
    return CHECKPOINT_BYTES_PER_PARAM * n_params


def claim_for_fresh_run(run_dir: Path, *, overwrite: bool, has_checkpoints: bool) -> Path | None:
    """A fresh run (not a resume) in ``run_dir``: refuse if an earlier run left checkpoints there, unless
    ``overwrite``; then (or when only an earlier run's metrics are there) move the earlier run's files into
    ``run_dir/replaced-<time>`` (renamed, never deleted). Returns that directory (None: nothing was moved)."""
    if has_checkpoints and not overwrite:
        raise RunDirError(
            f"run_dir {run_dir} already holds checkpoints of an earlier run: pass trainer.resume=true to continue "
            "it, choose another run_dir, or pass trainer.overwrite=true to move them aside (into "
            f"{run_dir}/replaced-<time>) and start fresh"
        )
    earlier = [run_dir / name for name in ("checkpoints", "metrics.jsonl", "config.yaml")]
    earlier = [p for p in earlier if p.exists()]
    if not (has_checkpoints or (run_dir / "metrics.jsonl").exists()):
        return None
    aside = run_dir / time.strftime("replaced-%Y%m%d-%H%M%S")
    n = 1
    while aside.exists():
        aside = run_dir / f"{time.strftime('replaced-%Y%m%d-%H%M%S')}-{n}"
        n += 1
    aside.mkdir()
    for path in earlier:
        os.rename(path, aside / path.name)
    return aside


def estimate_parameters(config: Any) -> int:
    """Parameters of the model ``config`` (a family's config dataclass) describes, counted by its family
    without building it."""
    from nemo_lite.components.models import family_of_config

    return family_of_config(config).num_parameters(config)


def available_memory(device_type: str, device_index: int | None = None) -> int | None:
    """Bytes free on the device the model is built on (None: unknown)."""
    if device_type == "cuda":
        import torch

        try:
            return torch.cuda.mem_get_info(device_index or 0)[0]
        except RuntimeError:
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_model_fits(config: Any, *, what: str, device_type: str, device_index: int | None, world_size: int) -> None:
    """Refuse a model whose training state cannot fit in the device's memory, before it is built."""
    n = estimate_parameters(config)
    need = TRAINING_BYTES_PER_PARAM * n // max(world_size, 1)
    have = available_memory(device_type, device_index)
    if have is not None and need > have:
        shape = ", ".join(
            f"{f}={getattr(config, f)}"
            for f in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
            if f in {x.name for x in dataclasses.fields(config)}
        )
        raise ConfigError(
            f"{what} ({shape}) has about {n / 1e9:.2f}B parameters, whose training state needs about "
            f"{human_bytes(need)} per rank; this {device_type} has {human_bytes(have)} free: choose a smaller shape"
        )


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
