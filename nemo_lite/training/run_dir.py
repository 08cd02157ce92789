"""A run owns its run directory: a lock, and the checks made before any data or model is built.

    lock = RunLock(run_dir)          # refuses a second run on the same directory (names its pid)
    check_writable(run_dir, need_bytes=3 * checkpoint_bytes(n_params),
                   held_bytes=held_checkpoint_bytes(run_dir / "checkpoints"))  # a resume's own count as free
    refuse_fresh_run(run_dir, overwrite=False, has_checkpoints=...)   # refuses to bury older checkpoints
    refuse_empty_resume(run_dir)             # resume=true without a checkpoint, beside an export: refused
    moved = move_earlier_outputs(run_dir)    # after every other check: the earlier run's files, moved aside

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
# Input ids, labels and positions of a batch, int64 each.
BATCH_BYTES_PER_TOKEN = 3 * 8
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


def check_run_dir_path(run_dir: Path) -> None:
    """What can be said of ``run_dir`` without creating it: not a file, not a link to nowhere, and either a
    directory or creatable (its nearest existing parent is a writable directory). The launcher calls it before
    Hydra makes the directory, so a bad path is one line, not a traceback."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise RunDirError(
            f"run_dir {run_dir} is a symbolic link to {os.readlink(run_dir)}, which does not exist: "
            "create its target or choose another run_dir"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run_dir {run_dir} is a file, not a directory: choose another run_dir")
    existing = run_dir.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"run_dir {run_dir} cannot be created: {existing} is a file; choose another run_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"run_dir {run_dir} is not writable ({existing} is read-only): choose another run_dir")


def check_writable(run_dir: Path, need_bytes: int, *, held_bytes: int = 0) -> None:
    """``run_dir`` is (or can be made) a writable directory with at least ``need_bytes`` free, counting the
    ``held_bytes`` the run's own checkpoints hold there (see :func:`check_free_space`)."""
    check_run_dir_path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir {run_dir} is not writable ({err.strerror}): choose another run_dir") from None
    check_free_space(run_dir, need_bytes, held_bytes=held_bytes)


def check_free_space(run_dir: Path, need_bytes: int, *, held_bytes: int = 0) -> None:
    """At least ``need_bytes`` (``FREE_SPACE_FACTOR`` checkpoints) for the checkpoints. A resumed run's own
    checkpoints (``held_bytes``, :func:`held_checkpoint_bytes`) count toward it: the saves prune them as they
    go. One checkpoint must be free whatever they hold, since a save writes before it prunes."""
    free = shutil.disk_usage(run_dir).free
    need_free = max(need_bytes - held_bytes, need_bytes // max(FREE_SPACE_FACTOR, 1))  # 0: the check is off
    if free >= need_free:
        return
    if held_bytes:
        raise RunDirError(
            f"run_dir {run_dir} has {human_bytes(free)} free; resuming needs about {human_bytes(need_free)} free "
            f"({FREE_SPACE_FACTOR} x one checkpoint less the {human_bytes(held_bytes)} its checkpoints hold, and at "
            "least one checkpoint, written before an older one is pruned): free some space or choose another run_dir"
        )
    raise RunDirError(
        f"run_dir {run_dir} has {human_bytes(free)} free; the checkpoints need about {human_bytes(need_bytes)} "
        f"({FREE_SPACE_FACTOR} x one checkpoint): free some space or choose another run_dir"
    )


def held_checkpoint_bytes(root: Path) -> int:
    """Bytes of the files under a run's checkpoint directory ``root`` (its checkpoints, and what a crashed
    save left, which the next save removes)."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def checkpoint_bytes(n_params: int) -> int:
    return CHECKPOINT_BYTES_PER_PARAM * n_params


# What a run writes into its run_dir; a fresh run moves an earlier run's into replaced-<time> (EXPORT_MARKER
# is written last by an export, so a run without it has no complete export).
EXPORT_MARKER = "export.json"
RUN_OUTPUTS = (
    "checkpoints",
    "metrics.jsonl",
    "config.yaml",
    "hf",
    "adapter",
    "tokenizer",
    EXPORT_MARKER,
    "profile",
    "eval",
    "generations.jsonl",
    "wandb",
)


# The configs of a run's earlier settings, kept by a resume with other settings (keep_earlier_config).
KEPT_CONFIGS = "config-step_*.yaml"


def refuse_fresh_run(run_dir: Path, *, overwrite: bool, has_checkpoints: bool, reads: Path | None = None) -> None:
    """A fresh run (not a resume) in ``run_dir`` is refused if an earlier run left checkpoints there, unless
    ``overwrite``, and if it reads (``reads``: its pretrained checkpoint) from an earlier output that it would
    move aside. Nothing is moved here: :func:`move_earlier_outputs` does that once every other check passed."""
    if has_checkpoints and not overwrite:
        raise RunDirError(
            f"run_dir {run_dir} already holds checkpoints of an earlier run: pass trainer.resume=true to continue "
            "it, choose another run_dir, or pass trainer.overwrite=true to move them aside (into "
            f"{run_dir}/replaced-<time>) and start fresh"
        )
    if reads is None:
        return
    reads = Path(os.path.realpath(reads))
    for name in RUN_OUTPUTS:
        output = Path(os.path.realpath(run_dir / name))
        if os.path.lexists(run_dir / name) and (reads == output or output in reads.parents):
            raise RunDirError(
                f"model.pretrained_path {reads} is the earlier run's {name} in run_dir {run_dir}, which a fresh run "
                "there moves aside (into replaced-<time>): choose another run_dir, or copy the checkpoint elsewhere"
            )


def refuse_empty_resume(run_dir: Path) -> None:
    """``trainer.resume=true`` in ``run_dir`` without a checkpoint: refused where an earlier run left an export
    (``hf/``, ``adapter/``) there, which a fresh run would move aside; it names how to train on from it instead."""
    exports = [name for name in ("adapter", "hf") if (run_dir / name).is_dir()]
    if not exports:
        return
    if "adapter" in exports:
        start = f"peft=lora peft.adapter_path={run_dir / 'adapter'}"
    else:
        start = f"model.pretrained_path={run_dir / 'hf'}"
    raise RunDirError(
        f"run_dir {run_dir} holds an export ({', '.join(name + '/' for name in exports)}) but no checkpoint, so "
        f"trainer.resume=true has nothing to resume: to train on from it, start a new run in another run_dir with "
        f"{start}; or pass trainer.resume=false to start fresh here (the export moves into {run_dir}/replaced-<time>)"
    )


def move_earlier_outputs(run_dir: Path) -> Path | None:
    """Move what an earlier run wrote (``RUN_OUTPUTS``: checkpoints, metrics, configs, exports, ...) into
    ``run_dir/replaced-<time>``, renamed, never deleted. Returns that directory (None: nothing was there)."""
    earlier = [run_dir / name for name in RUN_OUTPUTS if os.path.lexists(run_dir / name)]
    earlier += sorted(run_dir.glob(KEPT_CONFIGS))
    if not earlier:
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


# Settings that say how a run was started, not what it runs: a resume differs from its first run in them.
HOW_STARTED = ("trainer.resume", "trainer.overwrite")


def keep_earlier_config(run_dir: Path, text: str, step: int) -> str | None:
    """Before a resume from ``step`` writes its config (``text``) to ``run_dir/config.yaml``: if the config there
    holds other settings (another lr, more steps), rename it ``config-step_N.yaml`` (``-1``, ... if taken), as a
    step's checkpoint is named. Returns the line that says so (None: nothing to keep)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    changes = _config_changes(path.read_text(), text)
    if not changes:
        return None
    kept, n = run_dir / f"config-step_{step:06d}.yaml", 1
    while os.path.lexists(kept):
        kept, n = run_dir / f"config-step_{step:06d}-{n}.yaml", n + 1
    os.rename(path, kept)
    return f"config.yaml of the run up to step {step} had other settings ({changes}): kept as {kept}"


def _config_changes(earlier: str, now: str) -> str:
    """The settings of two configs (YAML) that differ, as ``key old -> new`` (a few, then a count)."""
    import yaml

    try:
        was = _flat(yaml.safe_load(earlier))
    except yaml.YAMLError:
        return "it is not readable YAML"
    new = _flat(yaml.safe_load(now))
    keys = [k for k in [*new, *(k for k in was if k not in new)] if k not in HOW_STARTED]
    diffs = [f"{k} {was.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in keys if was.get(k) != new.get(k)]
    return ", ".join(diffs[:6]) + (f", and {len(diffs) - 6} more" if len(diffs) > 6 else "")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b": value}``."""
    flat: dict[str, Any] = {}
    for key, value in (tree if isinstance(tree, dict) else {}).items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def claim_for_fresh_run(run_dir: Path, *, overwrite: bool, has_checkpoints: bool) -> Path | None:
    """:func:`refuse_fresh_run`, then :func:`move_earlier_outputs`."""
    refuse_fresh_run(run_dir, overwrite=overwrite, has_checkpoints=has_checkpoints)
    return move_earlier_outputs(run_dir)


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


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one optimizer step holds besides the model: ``grad_accum`` micro-batches of ``batch_size`` rows of
    ``seq_len`` tokens, and activations of ``activation_bytes`` per element."""

    batch_size: int
    seq_len: int
    grad_accum: int = 1
    activation_bytes: int = 4

    def batch_bytes(self) -> int:
        """The step's batches, all taken before it runs: input ids, labels and positions as int64."""
        return self.grad_accum * self.batch_size * self.seq_len * BATCH_BYTES_PER_TOKEN

    def activation_floor(self, config: Any) -> int:
        """A floor under one micro-batch's activations that holds even with activation checkpointing: each
        decoder block keeps at least its input, ``seq_len x hidden_size`` per row."""
        layers, hidden = getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
        return self.batch_size * self.seq_len * hidden * layers * self.activation_bytes


def check_model_fits(
    config: Any,
    *,
    what: str,
    device_type: str,
    device_index: int | None,
    world_size: int,
    step: StepShape | None = None,
    training_bytes: int | None = None,
) -> None:
    """Refuse a run whose training state, batches and activations cannot fit in the device's memory, before
    the model or the data are built. Every term is a floor, so a run that fits is never refused.
    ``training_bytes``: the training state's size where the converters change it (LoRA's frozen base; None:
    16 bytes per parameter)."""
    n = estimate_parameters(config)
    need = (TRAINING_BYTES_PER_PARAM * n if training_bytes is None else training_bytes) // max(world_size, 1)
    have = available_memory(device_type, device_index)
    if have is None:
        return
    if need > have:
        shape = ", ".join(
            f"{f}={getattr(config, f)}"
            for f in ("num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size")
            if f in {x.name for x in dataclasses.fields(config)}
        )
        raise ConfigError(
            f"{what} ({shape}) has about {n / 1e9:.2f}B parameters, whose training state needs about "
            f"{human_bytes(need)} per rank; this {device_type} has {human_bytes(have)} free: choose a smaller shape"
        )
    if step is None:
        return
    batches, activations = step.batch_bytes(), step.activation_floor(config)
    if need + batches + activations > have:
        raise ConfigError(
            f"data.batch_size={step.batch_size} x data.seq_len={step.seq_len} x trainer.grad_accum={step.grad_accum} "
            f"needs at least {human_bytes(batches)} for one step's batches and {human_bytes(activations)} of "
            f"activations per micro-batch, beside {human_bytes(need)} of training state; this {device_type} has "
            f"{human_bytes(have)} free: lower data.seq_len, data.batch_size or trainer.grad_accum"
        )


def disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
