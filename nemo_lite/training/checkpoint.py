"""Training checkpoints: written atomically, kept to the last K, resumed exactly.

Layout (one directory per step, under ``<run_dir>/checkpoints``)::

    step_000120/
        model.safetensors     weights (safetensors: no pickle on load)
        train_state.pt        optimizer, scheduler, data-loader state, RNG, step (torch.load(weights_only=True))
        meta.json             step, each file's size and CRC-32, the run's layout; written last

A checkpoint is assembled in a hidden temporary directory beside the others (its name carries the
writer's host and pid), flushed to disk, then renamed to its final name in one ``os.rename``. A crash
at any moment leaves either the complete new checkpoint or none; the previous one is untouched until
the new one is in place, and only then are checkpoints beyond the last K removed. A temporary
directory left by a crash is removed by a later save once its writer is provably gone (this host, pid
not alive); a live writer's, or another host's, is never touched.

Loading checks every file against meta.json first, so a checkpoint damaged after it was written (cut
short, overwritten) is reported as such (:class:`CheckpointDamagedError`) and a resume can fall back to
the one before it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from nemo_lite.components.models.hf import share_modes
from nemo_lite.errors import NemoLiteError
from nemo_lite.training.run_dir import disk_full, host, human_bytes, pid_alive

STEP_DIR = re.compile(r"^step_(\d{6,})$")
TMP_PREFIX = ".tmp-"
# .tmp-step_000120-<host>-<pid>, and .tmp-old-step_000120-<host>-<pid> while a step is re-saved
TMP_NAME = re.compile(r"^\.tmp-(?:old-)?step_\d{6,}-(?P<host>.+)-(?P<pid>\d+)$")
# Free space under which a failed write is taken for a full disk (the writer may hide the errno).
DISK_NEARLY_FULL = 16 * 2**20
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "train_state.pt", "meta.json"


class NoCheckpointError(NemoLiteError, FileNotFoundError):
    """trainer.resume names no checkpoint (or a run_dir that holds none)."""


class CheckpointDamagedError(NemoLiteError):
    """A checkpoint whose files are missing, cut short or changed since they were written."""


class ResumeError(NemoLiteError):
    """This run cannot resume from the checkpoint(s) it was given (the message says why and what to do)."""


class CheckpointWriteError(NemoLiteError):
    """A checkpoint could not be written (a full disk); the partial one was removed."""


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


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a directory only gets a step_N name once complete)."""
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def _tmp_name(kind: str, final: Path) -> str:
    """A temporary directory's name carries its writer (host and pid), so another run can tell a live
    writer's directory from a dead one's."""
    return f"{TMP_PREFIX}{kind}{final.name}-{host()}-{os.getpid()}"


def clean_stale_tmp(ckpt_root: Path) -> list[Path]:
    """Remove the temporary directories of writers that are gone: this process's, and those of processes
    of this host that no longer exist. Another host's, or a live process's, are left alone."""
    removed = []
    for path in ckpt_root.glob(TMP_PREFIX + "*"):
        match = TMP_NAME.match(path.name)
        if match is None or match.group("host") != host():
            continue
        pid = int(match.group("pid"))
        if pid == os.getpid() or not pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def file_record(path: Path) -> dict[str, int]:
    """Size and CRC-32 of a file: what meta.json records, and what loading checks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"bytes": size, "crc32": crc}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    train_state: dict[str, Any],
    *,
    keep_last: int,
    layout: dict[str, Any] | None = None,
    only_trainable: bool = False,
) -> Path:
    """Write ``step_{step}`` atomically and prune the checkpoints before it to the last ``keep_last``.
    Returns its path. ``layout`` (what the run's shapes are, see :func:`layout_differences`) goes into
    meta.json with each file's size and CRC-32.

    ``model`` may be the tensors to save instead of a
    module. ``only_trainable``: the module's trainable parameters only (a LoRA run saves its adapters only).
    """
    from safetensors.torch import save_file, save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(ckpt_root)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / _tmp_name("", final)
    tmp.mkdir()
    if only_trainable:
        model = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    try:
        if isinstance(model, torch.nn.Module):
            save_model(model, str(tmp / MODEL_FILE))
        else:
            tensors = {k: v.contiguous() for k, v in model.items()}
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        _fsync_file(tmp / MODEL_FILE)
        torch.save(train_state, tmp / STATE_FILE)
        _fsync_file(tmp / STATE_FILE)
        files = {name: file_record(tmp / name) for name in (MODEL_FILE, STATE_FILE)}
        meta = {"step": step, "time": time.time(), "files": files, "layout": layout or {}}
        (tmp / META_FILE).write_text(json.dumps(meta))
        _fsync_file(tmp / META_FILE)
        share_modes(tmp)
        _fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # this writer's own partial checkpoint
        if _disk_full(err, ckpt_root):
            last = latest_checkpoint(ckpt_root)
            raise CheckpointWriteError(
                f"the disk is full: writing {final} failed ({human_bytes(shutil.disk_usage(ckpt_root).free)} "
                f"free); the partial checkpoint was removed and the last complete one is {last or 'none'}: free "
                "some space (or choose another run_dir) and resume with trainer.resume=true"
            ) from None
        raise
    if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave it missing
        old = ckpt_root / _tmp_name("old-", final)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(ckpt_root)
    # Only checkpoints up to this one are pruned: a later step (left by the run this one resumed from an
    # earlier checkpoint of) is replaced when this run saves that step, never deleted before.
    for old in [p for p in list_checkpoints(ckpt_root) if step_of(p) <= step][:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(err: BaseException, where: Path) -> bool:
    """ENOSPC, or an error of a writer that hides the errno (torch's zip writer, safetensors) on a disk
    that has (next to) nothing left."""
    if disk_full(err):
        return True
    if not isinstance(err, Exception) or isinstance(err, (KeyboardInterrupt, SystemExit)):
        return False
    try:
        return shutil.disk_usage(where).free < DISK_NEARLY_FULL
    except OSError:
        return False


def resumes(resume: bool | str | None) -> bool:
    """Whether ``trainer.resume`` asks to resume at all (true, latest, or a path)."""
    if resume is None or isinstance(resume, bool):
        return bool(resume)
    return str(resume).strip().lower() not in ("false", "no", "0", "none", "")


def resumes_latest(resume: bool | str | None) -> bool:
    """Whether ``trainer.resume`` asks for the latest checkpoint of the run_dir (true, latest)."""
    if resume is None or isinstance(resume, bool):
        return bool(resume)
    return str(resume).strip().lower() in ("true", "yes", "1", "latest")


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
    raise NoCheckpointError(
        f"trainer.resume={value!r}: no checkpoint there (expected a step_NNNNNN directory with {META_FILE}, "
        "or a run directory holding checkpoints/step_NNNNNN)"
    )


def named_exactly(resume: bool | str | None) -> bool:
    """``trainer.resume`` names one checkpoint (a step_NNNNNN directory): no other is tried in its place."""
    return isinstance(resume, str) and STEP_DIR.match(Path(resume.strip()).expanduser().name) is not None


def earlier_checkpoints(path: Path) -> list[Path]:
    """The complete checkpoints beside ``path`` with a lower step, newest first: where a resume falls back."""
    return [p for p in reversed(list_checkpoints(path.parent)) if step_of(p) < step_of(path)]


def is_sharded(path: Path) -> bool:
    """A checkpoint written by a torchrun run (torch.distributed.checkpoint shards)."""
    return (path / "dcp").is_dir()


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointDamagedError(f"{META_FILE} cannot be read ({_first_line(err)})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamagedError(f"{META_FILE} is not a JSON object")
    return meta


def check_file(path: Path, name: str, want: Any) -> None:
    """``path / name`` against its manifest record ``want`` (``{"bytes": int, "crc32": int}``); a record of
    another shape is a damaged manifest, refused as such (never a KeyError that one rank alone would raise)."""
    if not isinstance(want, dict) or not all(isinstance(want.get(key), int) for key in ("bytes", "crc32")):
        raise CheckpointDamagedError(f"{META_FILE}'s record of {name} is not a size and a checksum: {want!r}")
    size = (path / name).stat().st_size
    if size != want["bytes"]:
        raise CheckpointDamagedError(f"{name} has {size} bytes, {want['bytes']} were written")
    if file_record(path / name)["crc32"] != want["crc32"]:
        raise CheckpointDamagedError(f"{name} does not match its checksum")


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check every file against meta.json (size and CRC-32); return the meta. Raises CheckpointDamagedError
    with what is wrong. A checkpoint written before meta.json had checksums is checked for its files only."""
    meta = read_meta(path)
    files = meta.get("files")
    records = files if isinstance(files, dict) else dict.fromkeys(files or [MODEL_FILE, STATE_FILE])
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise CheckpointDamagedError(f"{name} is missing")
        want = records.get(name)
        if want is not None:  # None: a checkpoint from before the checksums
            check_file(path, name, want)
    return meta


def layout_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key saved -> current`` for each key both layouts have and that differs (JSON values)."""
    current = json.loads(json.dumps(current))
    return [f"{key} {saved[key]} -> {current[key]}" for key in saved if key in current and saved[key] != current[key]]


def load_checkpoint(
    path: Path,
    model: torch.nn.Module | None,
    device: torch.device | str = "cpu",
    *,
    layout: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Verify ``path`` (:func:`verify_checkpoint`), load its weights into ``model`` (strict) and return the
    train state (optimizer, loader, ...). Raises CheckpointDamagedError for a damaged checkpoint and
    ResumeError for one of another shape (``layout``: this run's, compared with the saved one's). ``model=None``
    leaves the weights to :func:`load_weights`, once the caller has checked the train state."""
    meta = verify_checkpoint(path)
    differences = layout_differences(meta.get("layout") or {}, layout or {})
    if differences:
        raise ResumeError(
            f"cannot resume from {path}: it was saved by a run of another shape ({', '.join(differences)}); "
            "resume with the settings it was saved with, or start fresh in another run_dir"
        )
    if model is not None:
        load_weights(path, model, device)
    # The train state stays on the CPU: RNG states must be CPU byte tensors, and the optimizer's
    # load_state_dict moves its state to each parameter's device itself.
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointDamagedError(
            f"{STATE_FILE} cannot be read with torch.load(weights_only=True) ({_first_line(err, 120)})"
        ) from None


def load_weights(
    path: Path, model: torch.nn.Module, device: torch.device | str = "cpu", *, only_trainable: bool = False
) -> None:
    """Load the weights of the verified checkpoint ``path`` into ``model`` (strict). ``only_trainable``: the
    checkpoint holds the trainable parameters only (:func:`save_checkpoint`) and they must be exactly those;
    the frozen ones stay as the model has them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    try:
        if not only_trainable:
            load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
            return
        tensors = load_file(str(path / MODEL_FILE))
    except SafetensorError as err:
        raise CheckpointDamagedError(f"{MODEL_FILE} cannot be read ({_first_line(err)})") from None
    except RuntimeError as err:  # strict loading: other tensor names or shapes
        raise ResumeError(
            f"cannot resume from {path}: its weights do not fit this model ({_first_line(err, 300)}); resume with "
            "the model it was saved with, or start fresh in another run_dir"
        ) from None
    params = dict(model.named_parameters())
    expected = {name for name, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ResumeError(
            f"cannot resume from {path}: it does not hold this run's trainable parameters: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split("\n")[:2]).strip() or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
