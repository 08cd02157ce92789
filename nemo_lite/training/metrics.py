"""Step metrics: FLOPs of the actual mask, MFU, and where they are written (jsonl, wandb).

MFU counts the matmul FLOPs per token that the model family gives (``ModelFamily.flops_per_token``: 6 x
the parameters that multiply each token), plus the attention FLOPs of the pairs the step's mask really
allows in each layer, sliding windows included (``ModelFamily.attention_flops``, which counts them with
:func:`~nemo_lite.components.attention.masks.allowed_pairs`). A block-causal step with short documents
therefore counts far fewer attention FLOPs than a causal one.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peak (FLOP/s) by device-name fragment; the H200 shares the H100's compute.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, flops in PEAK_BF16_FLOPS.items():
        if fragment in name:
            return flops
    return None


class DeviceTimer:
    """Adds up the time of the blocks it times: CUDA events on a GPU (read once, after the step's host sync),
    the host clock elsewhere.

        timer = DeviceTimer(device)
        with timer:
            ...
        timer.seconds()
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.host_seconds = 0.0

    def __enter__(self) -> DeviceTimer:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((self._start, end))
        else:
            self.host_seconds += time.perf_counter() - self._t0

    def seconds(self) -> float:
        return self.host_seconds + sum(start.elapsed_time(end) for start, end in self.events) / 1000.0


class MetricsWriter:
    """Writes every step's metrics to ``metrics.jsonl`` (line-buffered, flushed) and, if asked, wandb.

    A run resumed at step ``resumed_step`` first cuts the file back to the records of steps up to that one
    (the records of the steps it is about to run again, and a line cut short by a crash, are dropped), so the
    file holds one record per step and a plot of it one curve.
    """

    def __init__(
        self, run_dir: Path, logger_cfg: Any, config: dict[str, Any], enabled: bool = True, resumed_step: int = 0
    ) -> None:
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        self.path = run_dir / "metrics.jsonl"
        truncate_metrics(self.path, resumed_step)
        self.file = open(self.path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        if logger_cfg.name == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise ImportError(
                    "logger=wandb needs the wandb package: pip install 'nemo_lite[wandb]' (or use logger=jsonl)"
                ) from err
            self.wandb_run = wandb.init(
                project=logger_cfg.project,
                name=logger_cfg.run_name,
                mode=logger_cfg.mode,
                dir=str(run_dir),
                config=config,
            )

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json_line(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of ``path`` up to ``last_step`` (replacing the file in one rename). Returns how many
    records were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= last_step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def json_line(record: dict[str, Any]) -> str:
    """``record`` as strict JSON: a NaN or infinite value (a step whose loss or gradient norm was not finite)
    is written as null and named with its value under ``"nonfinite_values"`` (``{"loss": "nan"}``), since JSON has no
    NaN and readers other than Python's refuse one."""
    nonfinite = {k: str(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if nonfinite:
        record = {**{k: None if k in nonfinite else v for k, v in record.items()}, "nonfinite_values": nonfinite}
    return json.dumps(record, allow_nan=False)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``, non-finite values restored as floats."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for record in records:
        record.update({k: float(v) for k, v in record.pop("nonfinite_values", {}).items()})
    return records
