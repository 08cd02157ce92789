"""Sharded (torchrun) checkpoints held to the single-process standard: a checksummed manifest, checked before
anything is read, and DCP read without unpickling untrusted bytes.

``step_NNNNNN/meta.json`` lists every file of the checkpoint (``dcp/`` shards and ``.metadata``, the
``rankNNNNN.pt`` files) with its size and CRC-32, and the run's layout. Each rank checksums the files it
wrote (DCP names a rank's shards ``__<rank>_*``; its ``rankNNNNN.pt``) while they are still in its page
cache and on its own node, so the save reads each byte once, spread over the ranks; rank 0 takes the rest
(``.metadata``) and writes the manifest.

Loading verifies on rank 0 and sends the verdict to every rank, so all ranks raise the same one-line error
(or none) and no rank waits on a collective another has left. Then DCP reads through :class:`SafeReader`,
whose ``.metadata`` unpickler builds only the classes DCP metadata is made of, and :class:`SafePlanner`,
which loads the non-tensor entries with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

from nemo_lite.training import checkpoint as ckpt

RANK_FILE = re.compile(r"^rank(\d{5})\.pt$")
DCP_SHARD = re.compile(r"^__(\d+)_")

# What DCP's .metadata is made of (torch 2.11 to 2.13); torch dtypes are allowed by type, not by name.
METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"),
    ("pathlib._local", "PurePosixPath"),
    ("pathlib._local", "WindowsPath"),
    ("pathlib._local", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) not in METADATA_CLASSES:
            raise ckpt.CheckpointDamagedError(
                f"dcp/.metadata names {module}.{name}, which is not part of DCP checkpoint metadata: refusing to "
                "load it (a tampered file?); resume from another checkpoint"
            )
        if module.startswith("pathlib"):
            return getattr(pathlib, name)  # the class of this Python (pathlib._local is 3.13's home)
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """A FileSystemReader whose ``.metadata`` is unpickled with the allowlist above; read once and kept."""

    _metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any):
        if self._metadata is None:
            with open(Path(self.path) / ".metadata", "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except ckpt.CheckpointDamagedError:
                    raise
                except Exception as err:  # noqa: BLE001 - any unpickling failure is a damaged file
                    raise ckpt.CheckpointDamagedError(
                        f"dcp/.metadata cannot be read ({ckpt._first_line(err)})"
                    ) from None
            from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

            if not isinstance(metadata, Metadata):
                raise ckpt.CheckpointDamagedError(f"dcp/.metadata holds a {type(metadata).__name__}, not DCP metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            self._metadata = metadata
        return self._metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, loading the non-tensor entries (optimizer hyperparameters) with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint import default_planner  # its own set_element, whatever torch's version

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def owned_files(tmp: Path, rank: int, world_size: int) -> list[str]:
    """The checkpoint's files (relative paths) this rank checksums: those it wrote by their names, and on rank
    0 every file no rank claims."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())

    def writer(name: str) -> int:
        base = name.rsplit("/", 1)[-1]
        match = RANK_FILE.match(base) or DCP_SHARD.match(base)
        owner = int(match.group(1)) if match else 0
        return owner if owner < world_size else 0

    return [n for n in names if writer(n) == rank and n != ckpt.META_FILE]


def verify_sharded(path: Path) -> dict[str, Any]:
    """Check every file of a sharded checkpoint against its manifest (size and CRC-32); return the meta. A
    checkpoint from before the manifest is checked for its files only."""
    meta = ckpt.read_meta(path)
    files = meta.get("files")
    world = meta.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise ckpt.CheckpointDamagedError(f"{ckpt.META_FILE} has no world_size")
    needed = [f"rank{r:05d}.pt" for r in range(world)] + ["dcp/.metadata"]
    for name in needed if not isinstance(files, dict) else sorted(set(needed) | set(files)):
        if not (path / name).is_file():
            raise ckpt.CheckpointDamagedError(f"{name} is missing")
    if not isinstance(files, dict):
        return meta
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {ckpt.META_FILE}
    extra = sorted(present - set(files))
    if extra:
        raise ckpt.CheckpointDamagedError(f"{extra[0]} is not in {ckpt.META_FILE} (a file added after the save)")
    for name, want in sorted(files.items()):
        if ".." in Path(name).parts:
            raise ckpt.CheckpointDamagedError(f"{ckpt.META_FILE} names {name}, outside the checkpoint")
        ckpt.check_file(path, name, want)
    return meta


GLOBAL_BATCH = "data.batch_size x ranks"


def _global_batch(layout: dict[str, Any], world_size: int) -> dict[str, Any]:
    """``data.batch_size`` is per rank; what a checkpoint must agree with across rank counts is the global
    batch (the data-loader state counts global rows, docs/distributed.md)."""
    layout = dict(layout)
    if isinstance(layout.get("data.batch_size"), int):
        layout[GLOBAL_BATCH] = layout.pop("data.batch_size") * world_size
    return layout


def check_layout(path: Path, meta: dict[str, Any], layout: dict[str, Any] | None, world_size: int = 1) -> None:
    """The single-process refusal of a checkpoint of another shape, in the same words; the batch is compared
    as a global batch (``world_size``: this run's ranks; the checkpoint's are in its meta, 1 if absent)."""
    saved = _global_batch(meta.get("layout") or {}, int(meta.get("world_size") or 1))
    differences = ckpt.layout_differences(saved, _global_batch(layout or {}, world_size))
    if differences:
        raise ckpt.ResumeError(
            f"cannot resume from {path}: it was saved by a run of another shape ({', '.join(differences)}); "
            "resume with the settings it was saved with, or start fresh in another run_dir"
        )
