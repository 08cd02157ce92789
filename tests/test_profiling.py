"""trainer.profile_steps: a trace and a summary of where the step's time went."""

from __future__ import annotations

import gzip
import json

from recipe_utils import tiny_config

from nemo_lite.training.profiling import kernel_class, summarize_trace
from nemo_lite.training.trainer import Trainer


def _kernel(name: str, start_ms: float, stop_ms: float) -> dict:
    return {"cat": "kernel", "name": name, "ts": start_ms * 1000, "dur": (stop_ms - start_ms) * 1000}


def test_summary_classes_kernels_and_finds_the_nccl_time_nothing_overlapped():
    trace = {
        "traceEvents": [
            _kernel("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", 0, 10),
            _kernel("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", 5, 20),  # 5 ms under the matmul, 10 alone
            _kernel("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 20, 26),
            _kernel("triton_poi_fused__to_copy_1", 30, 32),  # an idle gap of 4 ms before it
            {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},
        ]
    }
    summary = summarize_trace(trace, steps=2)
    assert summary["ms_per_step_by_class"] == {
        "communication (nccl)": 7.5,
        "matmul": 5.0,
        "adamw": 3.0,
        "compiled elementwise (triton)": 1.0,
    }
    assert summary["gpu_busy_ms_per_step"] == 14.0  # (26 + 2) / 2
    assert summary["compute_busy_ms_per_step"] == 9.0  # (10 + 6 + 2) / 2
    assert summary["nccl_exposed_ms_per_step"] == 5.0
    assert summary["trace_span_ms_per_step"] == 16.0
    # The one idle gap: 26 -> 30 ms, after the optimizer, before the next kernel (the overlapped NCCL kernel
    # and the matmul under it leave none).
    assert summary["idle_ms_per_step"] == 2.0 and summary["idle_gaps_per_step"] == 0.5
    assert summary["largest_idle_ms_per_step"] == {
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunc -> triton_poi_fused__to_copy_1": {
            "ms": 2.0,
            "gaps": 1,
        }
    }


def test_kernels_are_attributed_to_the_operator_that_launched_them():
    def op(name, ext, dims):
        return {"cat": "cpu_op", "name": name, "ts": 0, "dur": 1, "args": {"External id": ext, "Input Dims": dims}}

    def kernel(name, ext, start, stop):
        return {**_kernel(name, start, stop), "args": {"External id": ext}}

    trace = {
        "traceEvents": [
            op("aten::sum", 7, [[8192, 2048], []]),
            op("aten::fill_", 9, [[128256, 2048], []]),
            kernel("reduce_kernel<float>", 7, 0, 3),
            kernel("reduce_kernel<float>", 7, 10, 13),
            kernel("FillFunctor<float>", 9, 20, 21),
            _kernel("Memcpy DtoH (Device -> Pinned)", 30, 32),  # no External id
        ]
    }
    by_op = summarize_trace(trace, steps=2)["top_kernels_by_operator_ms_per_step"]
    assert by_op == {
        "aten::sum [[8192, 2048]] > reduce_kernel<float>": 3.0,
        "(no operator) > Memcpy DtoH (Device -> Pinned)": 1.0,
        "aten::fill_ [[128256, 2048]] > FillFunctor<float>": 0.5,
    }


def test_compiled_casts_are_elementwise_not_copies():
    assert kernel_class("triton_poi_fused__to_copy_t_7") == "compiled elementwise (triton)"
    # a float8 cast fused by inductor names the op it feeds, but is no matmul
    assert kernel_class("triton_poi_fused__scaled_mm__to_copy_clamp_mul_reciprocal_t_view_15") == (
        "compiled elementwise (triton)"
    )
    assert kernel_class("nvjet_sm90_qqtst_256x128_128x4_1x2_h_bz_coopA_TNT") == "matmul"
    assert kernel_class("Memcpy HtoD (Pinned -> Device)") == "memset / memcpy"
    assert kernel_class("triton_tem_fused_flex_attention_backward_5") == "flex attention"


def test_a_profiled_run_writes_a_trace_and_a_summary(tmp_path):
    cfg = tiny_config(tmp_path, "sdpa", steps=5)
    cfg.trainer.profile_steps, cfg.trainer.profile_start = 2, 1
    cfg.trainer.val_every, cfg.trainer.sample_tokens = 0, 0
    result = Trainer(cfg).fit()
    assert result.status == "completed" and result.steps == 5
    profile = tmp_path / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["summary.json", "trace_rank0.json.gz"]
    with gzip.open(profile / "trace_rank0.json.gz", "rt") as f:
        trace = json.load(f)
    steps = {e["name"] for e in trace["traceEvents"] if str(e.get("name", "")).startswith("ProfilerStep")}
    assert steps == {"ProfilerStep#1", "ProfilerStep#2"}  # steps 2 and 3 (the profiler counts from 0)
    summary = json.loads((profile / "summary.json").read_text())
    assert summary["device"] == "cpu" and summary["steps"] == 2
    assert any(op in summary["top_cpu_ops_ms_per_step"] for op in ("aten::mm", "aten::addmm", "aten::bmm"))
