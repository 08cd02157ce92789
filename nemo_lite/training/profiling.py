"""A torch.profiler window over a few training steps: a Chrome trace and a summary of where the time went.

``trainer.profile_steps=N`` (with ``trainer.profile_start``, the steps skipped first) records N steps on
rank 0 and writes ``run_dir/profile/trace_rank0.json.gz`` (open it in Perfetto or chrome://tracing) and
``run_dir/profile/summary.json``: GPU kernel time per step by class (matmuls, attention, optimizer,
communication, ...), how much of the step the GPU was busy, how much NCCL time no compute kernel
overlapped, where the GPU sat idle (the largest gaps between kernels, by the kernels around them), and
the kernels by the operator (and its input shapes) that launched them.
On CPU the summary lists the operators with the most time instead.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import torch

KERNEL_CLASSES = [  # (class, substrings of the lower-cased kernel name); the first match wins
    ("communication (nccl)", ("nccl",)),
    ("flex attention", ("flex_attention", "flex_decoding", "tem_fused_flex")),
    ("flash / varlen attention", ("flash", "fmha")),
    # Inductor's fused pointwise/reduction kernels, before matmul: their names list the ops they fused, and
    # float8's casts fused into them read "..._scaled_mm_..." without being matmuls.
    ("compiled elementwise (triton)", ("triton_poi_", "triton_red_", "triton_per_")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "triton_tem_fused_mm", "_mm_")),
    ("adamw", ("adam",)),
    ("foreach / reductions", ("foreach", "multi_tensor", "norm_kernel", "reduce_kernel")),
    ("embedding / indexing", ("embedding", "index", "scatter", "radix", "sort")),
    ("memset / memcpy", ("memset", "memcpy")),
    ("compiled elementwise (triton)", ("triton_",)),
    ("eager elementwise", ("elementwise", "vectorized")),
]
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kernel_class(name: str) -> str:
    lowered = name.lower()
    return next((cls for cls, keys in KERNEL_CLASSES if any(k in lowered for k in keys)), "other")


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, stop) intervals given in microseconds."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1000


def idle_gaps(kernels: list[dict[str, Any]], steps: int, min_us: float = 20.0, top: int = 10) -> dict[str, Any]:
    """Where the GPU waited: gaps of at least ``min_us`` between one kernel's end (the latest so far) and the
    next kernel's start, summed per step, and the largest sums by (kernel before, kernel after)."""
    ordered = sorted(kernels, key=lambda e: e["ts"])
    total, by_pair, count = 0.0, {}, 0
    end, before = ordered[0]["ts"] + ordered[0]["dur"], ordered[0]["name"]
    for e in ordered[1:]:
        gap = e["ts"] - end
        if gap >= min_us:
            total += gap
            count += 1
            pair = f"{before[:60]} -> {e['name'][:60]}"
            ms, n = by_pair.get(pair, (0.0, 0))
            by_pair[pair] = (ms + gap / 1000 / steps, n + 1)
        if e["ts"] + e["dur"] > end:
            end, before = e["ts"] + e["dur"], e["name"]
    ranked = sorted(by_pair.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "idle_ms_per_step": round(total / 1000 / steps, 2),
        "idle_gaps_per_step": round(count / steps, 1),
        "largest_idle_ms_per_step": {pair: {"ms": round(ms, 3), "gaps": n} for pair, (ms, n) in ranked},
    }


def kernels_by_op(events: list[dict[str, Any]], kernels: list[dict[str, Any]], steps: int, top: int) -> dict:
    """GPU time per step by (the operator that launched the kernel, the kernel): a kernel carries the
    ``External id`` of the innermost operator running when it was launched; with shapes recorded, the
    operator's input shapes are part of its name."""
    ops = {}
    for e in events:
        if e.get("cat") == "cpu_op" and "External id" in e.get("args", {}):
            dims = e["args"].get("Input Dims")
            shapes = "" if not dims else " " + str([d for d in dims if d])[:80]
            ops[e["args"]["External id"]] = e["name"] + shapes
    per: dict[str, float] = {}
    for e in kernels:
        op = ops.get(e.get("args", {}).get("External id"), "(no operator)")
        key = f"{op} > {e['name'][:60]}"
        per[key] = per.get(key, 0.0) + e["dur"] / 1000 / steps
    return {k: round(v, 3) for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]}


def summarize_trace(trace: dict[str, Any], steps: int, top: int = 25) -> dict[str, Any]:
    """Per-step figures from a Chrome trace (``export_chrome_trace``) that covers ``steps`` steps."""
    events = [e for e in trace.get("traceEvents", []) if "dur" in e and "ts" in e]
    kernels = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not kernels:  # CPU: the operators that took the most time
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "cpu_op":
                per_op[e["name"]] = per_op.get(e["name"], 0.0) + e["dur"] / 1000 / steps
        ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
        return {"steps": steps, "device": "cpu", "top_cpu_ops_ms_per_step": {k: round(v, 3) for k, v in ranked}}
    per_class: dict[str, float] = {}
    per_name: dict[str, float] = {}
    comm, compute = [], []
    for e in kernels:
        cls = kernel_class(e["name"])
        per_class[cls] = per_class.get(cls, 0.0) + e["dur"] / 1000 / steps
        short = e["name"][:100]
        per_name[short] = per_name.get(short, 0.0) + e["dur"] / 1000 / steps
        (comm if cls == "communication (nccl)" else compute).append((e["ts"], e["ts"] + e["dur"]))
    comm_ms, compute_ms = _union_ms(comm), _union_ms(compute)
    busy_ms = _union_ms(comm + compute)
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    return {
        "steps": steps,
        "device": "cuda",
        "ms_per_step_by_class": {k: round(v, 2) for k, v in sorted(per_class.items(), key=lambda kv: -kv[1])},
        "gpu_busy_ms_per_step": round(busy_ms / steps, 2),
        "compute_busy_ms_per_step": round(compute_ms / steps, 2),
        # NCCL time during which no other kernel ran: communication the step waited for.
        "nccl_exposed_ms_per_step": round((busy_ms - compute_ms) / steps, 2),
        "nccl_busy_ms_per_step": round(comm_ms / steps, 2),
        "trace_span_ms_per_step": round(span / 1000 / steps, 2),
        "top_kernels_ms_per_step": {k: round(v, 3) for k, v in ranked},
        "top_kernels_by_operator_ms_per_step": kernels_by_op(events, kernels, steps, 2 * top),
        **idle_gaps(kernels, steps),
    }


class StepProfiler:
    """Profiles steps ``start + 1 .. start + steps`` (1-based) of this process; call ``step()`` after each."""

    def __init__(self, out_dir: Path, start: int, steps: int, device_type: str) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.out_dir, self.steps = Path(out_dir), steps
        self.summary: dict[str, Any] | None = None
        schedule = torch.profiler.schedule(wait=max(start - 1, 0), warmup=1 if start > 0 else 0, active=steps, repeat=1)
        self._prof = torch.profiler.profile(
            activities=activities, schedule=schedule, on_trace_ready=self._write, record_shapes=True
        )
        self._prof.start()
        self._open = True

    def _write(self, prof) -> None:
        """Trace and summary, each written under a temporary name and renamed into place."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / ".trace_rank0.tmp.json.gz"
        prof.export_chrome_trace(str(tmp))  # gzipped by torch for a .gz name
        with gzip.open(tmp, "rt") as f:
            self.summary = summarize_trace(json.load(f), self.steps)
        tmp.replace(self.out_dir / "trace_rank0.json.gz")
        summary_tmp = self.out_dir / ".summary.tmp.json"
        summary_tmp.write_text(json.dumps(self.summary, indent=1))
        summary_tmp.replace(self.out_dir / "summary.json")

    def step(self) -> None:
        if self._open:
            self._prof.step()
            if self.summary is not None:  # the window is written: stop profiling
                self.close()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._prof.stop()
