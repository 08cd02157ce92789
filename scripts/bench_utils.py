"""What the benchmark scripts share: CUDA-event timing, medians after warm-up, and the record of where a
figure was measured (card, versions, date, command)."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Iterable
from datetime import date

import torch


def cuda_time_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` calls, each timed alone with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_after_warmup(values: Iterable[float], skip: int) -> float:
    """The median of ``values`` without the first ``skip`` (compilation, allocator warm-up)."""
    kept = list(values)[skip:]
    if not kept:
        raise ValueError(f"nothing left after skipping {skip} warm-up values")
    return statistics.median(kept)


def meta() -> dict:
    """Where and when a figure was measured."""
    out = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out
