"""A torch.profiler window over a few training steps: a Chrome trace and a summary of where the time went.

``trainer.profile_steps=N`` (with ``trainer.profile_start``, the steps skipped first) records N steps on
rank 0 and writes ``run_dir/profile/trace_rank0.json.gz`` (open it in Perfetto or chrome://tracing) and
``run_dir/profile/summary.json``: GPU kernel time per step by class (matmuls, attention, optimizer,
communication, ...), how much of the step the GPU was busy, how much NCCL time no compute kernel
overlapped, where the GPU sat idle (the largest gaps between kernels, by the kernels around them), and
the kernels by the operator (and its input shapes) that launched them.
On CPU the summary lists the operators with the most time instead.

``step_breakdown`` reads the same trace per step, in the classes ``scripts/profile_step.py`` reports
(matmuls, attention forward and backward, fused elementwise, optimizer, loss, communication, idle gaps).
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


# ---- one step by kernel class (scripts/profile_step.py) ----------------------------------------------

ATTENTION_KEYS = ("flex_attention", "flash", "fmha", "sdpa", "attn")
BACKWARD_KEYS = ("backward", "bwd", "bprop", "cutlassb", "dot_do_o", "convert_dq")
STEP_CLASSES = [  # (class, substrings of the lower-cased kernel name); the first match wins
    ("communication", ("nccl",)),
    ("attention backward", ()),  # attention kernels, split by BACKWARD_KEYS
    ("attention forward", ()),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax", "logsoftmax")),
    ("optimizer", ("adam", "sum_squares", "multi_tensor_apply")),
    # before matmul: inductor names a fused kernel by the ops it fused, float8 casts "..._scaled_mm_..."
    ("elementwise (fused triton)", ("triton_poi_", "triton_red_", "triton_per_")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "triton_tem_fused_mm", "_mm_")),
    ("elementwise (fused triton)", ("triton_",)),
    ("other (eager kernels, copies, indexing)", ("",)),
]
IDLE = "idle gaps"
# Launch calls in a trace: the runtime API's (cudaLaunchKernel, eager torch) and the driver API's
# (cuLaunchKernel, which Triton's kernels go through: compiled blocks, flex, the fast step's own kernels).
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
STEP_CLASS_ORDER = [*dict.fromkeys(cls for cls, _ in STEP_CLASSES), IDLE]


def step_class(name: str) -> str:
    """The class of a GPU kernel in a training step's profile (``STEP_CLASS_ORDER`` less the idle gaps)."""
    lowered = name.lower()
    if "nccl" not in lowered and any(k in lowered for k in ATTENTION_KEYS):
        return "attention backward" if any(k in lowered for k in BACKWARD_KEYS) else "attention forward"
    return next(cls for cls, keys in STEP_CLASSES if any(k in lowered for k in keys))


def _clipped_union_us(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    return 1000 * _union_ms([(max(a, lo), min(b, hi)) for a, b in spans if b > lo and a < hi])


def step_breakdown(trace: dict[str, Any]) -> dict[str, Any]:
    """GPU time of the profiled steps by class, per step (mean over the steps of a Chrome trace).

    A kernel belongs to the step (``ProfilerStep#N`` on the host) during which it was launched (its
    ``correlation`` with the launch call; a kernel without one, to the step its start falls in). A step's GPU
    span runs from its first kernel's start to its last kernel's end; its idle gaps are the time in that span
    when no kernel ran, so a step's class times (overlapping kernels each counted) plus its idle gaps make its
    span when kernels do not overlap. On a trace without GPU kernels (a CPU run), the host time of the steps.
    """
    events = [e for e in trace.get("traceEvents", []) if "dur" in e and "ts" in e]
    steps = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if str(e.get("name", "")).startswith("ProfilerStep#") and e.get("cat") != "gpu_user_annotation"
    )
    if not steps:
        raise ValueError("the trace has no ProfilerStep# events: profile with torch.profiler's schedule")
    host_ms = sum(b - a for a, b in steps) / 1000 / len(steps)
    kernels = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not kernels:
        host = round(host_ms, 3)
        return {"device": "cpu", "steps": len(steps), "host_step_ms": host, "ms_per_step": {"cpu": host}}
    launched = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})
    }

    def step_of(kernel: dict) -> int | None:
        t = launched.get(kernel.get("args", {}).get("correlation"), kernel["ts"])
        return next((i for i, (a, b) in enumerate(steps) if a <= t < b), None)

    per_step: list[list[dict]] = [[] for _ in steps]
    for k in kernels:
        i = step_of(k)
        if i is not None:
            per_step[i].append(k)
    all_spans = [(k["ts"], k["ts"] + k["dur"]) for k in kernels]
    totals = dict.fromkeys(STEP_CLASS_ORDER, 0.0)
    span_ms = gaps = 0.0
    counted = [ks for ks in per_step if ks]
    for ks in counted:
        for k in ks:
            totals[step_class(k["name"])] += k["dur"] / 1000
        lo, hi = min(k["ts"] for k in ks), max(k["ts"] + k["dur"] for k in ks)
        busy_us = _clipped_union_us(all_spans, lo, hi)
        totals[IDLE] += (hi - lo - busy_us) / 1000
        span_ms += (hi - lo) / 1000
        ordered = sorted((a, b) for a, b in all_spans if b > lo and a < hi)
        end = ordered[0][1]
        for a, b in ordered[1:]:
            gaps += a > end
            end = max(end, b)
    n = len(counted)
    return {
        "device": "cuda",
        "steps": n,
        "host_step_ms": round(host_ms, 3),
        "gpu_span_ms": round(span_ms / n, 3),
        "idle_gaps_per_step": round(gaps / n, 1),
        "ms_per_step": {cls: round(ms / n, 3) for cls, ms in totals.items()},
    }


def breakdown_markdown(breakdown: dict[str, Any]) -> str:
    """The breakdown as a markdown table: ms per step and share of the step's GPU span, by class."""
    if breakdown["device"] == "cpu":
        ms = breakdown["host_step_ms"]
        return f"| profiled on the CPU: no GPU kernels | ms per step |\n|---|---|\n| host time of a step | {ms:.2f} |\n"
    span = breakdown["gpu_span_ms"]
    lines = ["| kernel class | ms per step | share of the GPU span |", "|---|---|---|"]
    for cls, ms in breakdown["ms_per_step"].items():
        lines.append(f"| {cls} | {ms:.2f} | {100 * ms / span:.1f}% |")
    lines.append(f"| GPU span of a step (first kernel to last) | {span:.2f} | |")
    lines.append(f"| host time of a profiled step | {breakdown['host_step_ms']:.2f} | |")
    return "\n".join(lines) + "\n"


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
