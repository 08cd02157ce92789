"""trainer.profile_steps: a trace and a summary of where the step's time went."""

from __future__ import annotations

import gzip
import json

import pytest
from recipe_utils import tiny_config

from nemo_lite.training.profiling import (
    STEP_CLASS_ORDER,
    breakdown_markdown,
    kernel_class,
    step_breakdown,
    step_class,
    summarize_trace,
)
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


# Kernel names as profiles of training steps on H100/H200 show them (the nvjet, triton and nemo_lite kernels
# from this repository's own profiles in docs/results/; flash-attn 2 and 3, memory-efficient and cuDNN
# attention, cuBLAS and torch's loss and AdamW kernels as torch, flash-attn and cuDNN name them).
REAL_KERNELS = {
    "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT": "matmul",
    "nvjet_sm90_qqtst_256x128_128x4_1x2_h_bz_coopA_TNT": "matmul",  # float8
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas": "matmul",  # noqa: E501
    "triton_tem_fused__unsafe_view_flex_attention_transpose_view_3": "attention forward",
    "triton_tem_fused_flex_attention_backward_transpose_view_15": "attention backward",
    "triton_per_fused_flex_attention_backward_transpose_view_3": "attention backward",  # flex's delta = rowsum(dO*O)
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, cutlass::bfloat16_t>, false, true, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)": "attention forward",  # noqa: E501
    "void flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128, 64, 128, 8, 2, 4, 2, false, false, cutlass::bfloat16_t>>": "attention backward",  # noqa: E501
    "flash_bwd_dot_do_o_kernel": "attention backward",
    "flash_bwd_convert_dq_kernel": "attention backward",
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >>>>>": "attention forward",  # noqa: E501
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnBwdSm90<CollectiveMainloop, CollectiveEpilogue, Scheduler>>>": "attention backward",  # noqa: E501
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80": "attention forward",
    "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "attention backward",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x": "attention forward",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x": "attention backward",
    "_cross_entropy_kernel": "loss",
    "triton_red_fused__log_softmax__to_copy_prepare_softmax_online_0": "loss",
    "void at::native::<unnamed>::cunn_SoftMaxForward<(int)4, float, float, float, at::native::<unnamed>::LogSoftMaxForwardEpilogue>(T4 *, const T2 *, int)": "loss",  # noqa: E501
    "void at::native::<unnamed>::nll_loss_forward_reduce_cuda_kernel_2d<float, float, long>": "loss",
    "_adamw_kernel": "optimizer",
    "_sum_squares_kernel": "optimizer",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, (at::native::ADAM_MODE)1, false>>": "optimizer",  # noqa: E501
    "triton_poi_fused__unsafe_view_mul_silu_silu_backward_view_0": "elementwise (fused triton)",
    "triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_4": "elementwise (fused triton)",
    # a float8 cast fused by inductor
    "triton_poi_fused__scaled_mm__to_copy_clamp_mul_reciprocal_t_view_15": "elementwise (fused triton)",
    "ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "communication",
    "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long, long, long, long, bool)": (
        "other (eager kernels, copies, indexing)"
    ),
    "Memset (Device)": "other (eager kernels, copies, indexing)",
}


@pytest.mark.parametrize("name", REAL_KERNELS, ids=lambda n: n[:48])
def test_step_classes_of_real_kernel_names(name):
    assert step_class(name) == REAL_KERNELS[name]


def _step_trace() -> dict:
    """Two profiled steps on the host (0-100 ms and 100-200 ms); kernels launched in each, one of step 1
    running after its host step ended, an NCCL kernel under a matmul, a kernel with no launch record. Times
    in ms here, in us in the trace."""
    events = [
        {"cat": "user_annotation", "name": "ProfilerStep#5", "ts": 0, "dur": 100_000},
        {"cat": "user_annotation", "name": "ProfilerStep#6", "ts": 100_000, "dur": 100_000},
        {"cat": "gpu_user_annotation", "name": "ProfilerStep#5", "ts": 10_000, "dur": 300_000},  # not a host step
    ]

    def kernel(name, start, stop, launch=None, correlation=None, api="cuda_runtime"):
        if correlation is not None:
            events.append({"cat": api, "name": "cudaLaunchKernel", "ts": 1000 * launch, "dur": 1,
                           "args": {"correlation": correlation}})  # fmt: skip
        args = {} if correlation is None else {"correlation": correlation}
        events.append({**_kernel(name, start, stop), "args": args})

    # step 1: GPU span 10-110: busy 10-40, 45-60, 100-110 -> idle 5 + 40 = 45
    kernel("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NTT", 10, 40, 5, 1)
    kernel("triton_tem_fused__unsafe_view_flex_attention_transpose_view_3", 45, 60, 20, 2)
    kernel("_adamw_kernel", 100, 110, 90, 3, api="cuda_driver")  # Triton's launch in step 1; runs after it
    # step 2: GPU span 120-205: busy 120-150 (the NCCL kernel under the matmul), 160-170, 200-205 -> idle 40
    kernel("nvjet_sm90_tst_128x64_64x8_1x2_h_bz_NTT", 120, 150, 115, 4)
    kernel("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", 125, 140, 116, 5)
    kernel("_cross_entropy_kernel", 160, 170)  # no launch record: its start time places it in step 2
    kernel("_sum_squares_kernel", 200, 205, 195, 6, api="cuda_driver")  # launched in step 2, runs after the last step
    return {"traceEvents": events}


def test_step_breakdown_adds_up_classes_and_idle_gaps_per_step():
    breakdown = step_breakdown(_step_trace())
    assert breakdown["device"] == "cuda" and breakdown["steps"] == 2
    assert breakdown["host_step_ms"] == 100
    assert breakdown["gpu_span_ms"] == 92.5  # (100 + 85) / 2
    assert breakdown["idle_gaps_per_step"] == 2  # two gaps in each step
    ms = {cls: ms for cls, ms in breakdown["ms_per_step"].items() if ms}
    assert ms == {
        "matmul": 30,  # (30 + 30) / 2
        "attention forward": 7.5,
        "optimizer": 7.5,  # (10 + 5) / 2, both launched through the driver API
        "communication": 7.5,  # counted in full although the matmul ran beside it
        "loss": 5,
        "idle gaps": 42.5,  # (45 + 40) / 2
    }
    assert list(breakdown["ms_per_step"]) == STEP_CLASS_ORDER
    table = breakdown_markdown(breakdown)
    assert "| idle gaps | 42.50 | 45.9% |" in table and "| matmul | 30.00 | 32.4% |" in table


def test_step_breakdown_needs_profiler_steps_and_reports_host_time_without_kernels():
    with pytest.raises(ValueError, match="ProfilerStep"):
        step_breakdown({"traceEvents": [_kernel("_adamw_kernel", 0, 1)]})
    step = {"cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 2000}
    cpu = step_breakdown({"traceEvents": [step]})
    assert cpu == {"device": "cpu", "steps": 1, "host_step_ms": 2.0, "ms_per_step": {"cpu": 2.0}}


def test_the_profile_script_runs_at_toy_size(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import profile_step

    from nemo_lite.training import run_dir

    monkeypatch.setattr(run_dir, "FREE_SPACE_FACTOR", run_dir.FREE_SPACE_FACTOR)  # the script turns it off
    result = profile_step.profile(tmp_path, preset="tiny", start=1, steps=1, toy=True, ac="selective")
    saved = json.loads((tmp_path / "profile_step.json").read_text())
    assert saved["breakdown"] == result["breakdown"] and saved["profiled_steps"] == "2-2"
    assert saved["activation_checkpointing"] == "selective" and saved["tokens"] == "2x256"
    assert saved["tokens_per_s"] > 0 and "mfu" not in saved  # the steps after the window; no peak on a CPU
    assert result["breakdown"]["device"] == "cpu" and result["breakdown"]["host_step_ms"] > 0
    assert (tmp_path / "profile_step.md").read_text() == breakdown_markdown(result["breakdown"])
