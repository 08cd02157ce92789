"""Training checkpoints: written atomically, kept to the last K, resumed exactly.

Layout (one directory per step, under ``<run_dir>/checkpoints``)::

    step_000120/
        model.safetensors     weights (safetensors: no pickle on load)
        train_state.pt        optimizer, scheduler, data-loader state, RNG, step (torch.load(weights_only=True))
        meta.json             step and file list, written last

A checkpoint is assembled in a hidden temporary directory beside the others, flushed to disk, then
renamed to its final name in one ``os.rename``. A crash at any moment leaves either the complete new
checkpoint or none; the previous one is untouched until the new one is in place, and only then are
checkpoints beyond the last K removed. Temporary directories from a crash are ignored and cleaned.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

STEP_DIR = re.compile(r"^step_(\d{6,})$")
TMP_PREFIX = ".tmp-"
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "train_state.pt", "meta.json"


class CheckpointNotFoundError(FileNotFoundError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory only gets a step_N name once complete)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    train_state: dict[str, Any],
    *,
    keep_last: int,
    hooks: dict[str, Any] | None = None,
) -> Path:
    """Write ``step_{step}`` atomically and prune to the last ``keep_last``. Returns its path.

    ``hooks`` is for fault-injection tests: a callable under "after_file" is called with each
    file's name once it is written (before the rename). ``model`` may be the tensors to save instead of a
    module (a LoRA run saves its adapters only).
    """
    from safetensors.torch import save_file, save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_root.glob(TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    tmp.mkdir()
    after_file = (hooks or {}).get("after_file", lambda name: None)
    if isinstance(model, torch.nn.Module):
        save_model(model, str(tmp / MODEL_FILE))
    else:
        save_file({k: v.contiguous() for k, v in model.items()}, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    _fsync_file(tmp / MODEL_FILE)
    after_file(MODEL_FILE)
    torch.save(train_state, tmp / STATE_FILE)
    _fsync_file(tmp / STATE_FILE)
    after_file(STATE_FILE)
    meta = {"step": step, "time": time.time(), "files": [MODEL_FILE, STATE_FILE]}
    (tmp / META_FILE).write_text(json.dumps(meta))
    _fsync_file(tmp / META_FILE)
    after_file(META_FILE)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave it missing
        old = ckpt_root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_resume(resume: bool | str | None, run_dir: Path) -> Path | None:
    """``False`` -> None; ``True`` -> the latest checkpoint of run_dir (None if there is none yet);
    a path -> that checkpoint, or the latest inside that run/checkpoints directory (error if none)."""
    if resume is None or isinstance(resume, bool):
        return latest_checkpoint(run_dir / "checkpoints") if resume else None
    value = str(resume).strip()
    if value.lower() in ("false", "no", "0", "none", ""):
        return None
    if value.lower() in ("true", "yes", "1", "latest"):
        return latest_checkpoint(run_dir / "checkpoints")
    path = Path(value).expanduser()
    if STEP_DIR.match(path.name) and (path / META_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointNotFoundError(
        f"trainer.resume={value!r}: no checkpoint there (expected a step_NNNNNN directory with {META_FILE}, "
        "or a run directory holding checkpoints/step_NNNNNN)"
    )


def is_sharded(path: Path) -> bool:
    """A checkpoint written by a torchrun run (torch.distributed.checkpoint shards)."""
    return (path / "dcp").is_dir()


def load_checkpoint(path: Path, model: torch.nn.Module | None, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load weights into ``model`` (strict) and return the train state (optimizer, loader, ...). ``model=None``
    leaves the weights file to the caller (a LoRA run loads its adapters itself)."""
    from safetensors.torch import load_model

    missing = [name for name in (MODEL_FILE, STATE_FILE, META_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if model is not None:
        load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    # The train state stays on the CPU: RNG states must be CPU byte tensors, and the optimizer's
    # load_state_dict moves its state to each parameter's device itself.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
