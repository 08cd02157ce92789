"""Float8 training (torchao) against bf16 on one GPU, in two modes, each meant for one call of under ~9 minutes.

    python scripts/bench_float8.py throughput [--shapes 1b,3b] [--recipes bf16,tensorwise,rowwise] [--steps 25]
        [--out float8_throughput.json]
    python scripts/bench_float8.py throughput --recipes bf16,tensorwise-own-cast,tensorwise --out float8_ab.json
    python scripts/bench_float8.py profile [--shapes 1b,3b] [--recipes bf16,tensorwise] [--out float8_profile.json]
    python scripts/bench_float8.py curves [--steps 300] [--workloads corpus,synthetic]
        [--runs bf16-a,bf16-b,tensorwise] [--out float8_curves.json]

throughput: the workload of scripts/bench_train.py (2 x 4096 tokens per step of EOS-delimited random
documents, log-normal lengths, a new layout every step; the preset's 128256 vocabulary), with its best
config (flex attention, trainer.compile=true, the fast step), for the Llama-3.2-1B and -3B shapes, bf16
autocast against float8 tensorwise and rowwise. Per row: median tokens/s after 5 warm-up steps, MFU
counted against the bf16 dense peak (989 TFLOP/s on H100/H200) and against the float8 dense peak (twice
that), peak memory, and which linears were converted. Every row is written as it finishes.
``tensorwise`` is the fast step's default, whose AdamW kernel writes the converted layers' float8 weights
(nemo_lite.training.fast.float8_weights); ``tensorwise-own-cast`` is the same with
float8.weights_from_optimizer=false, every layer casting its own weight in forward and backward (torchao's
way): the second command above is their A/B against bf16, per shape, in one call.

profile: a torch.profiler window (3 steps after the warm-up) of bf16 and float8 on the throughput workload,
per shape: GPU time per step by kernel class, the matrix multiplications split into bf16 (aten::mm and
friends) and float8 (aten::_scaled_mm) by their input shapes, and the compiled (triton) kernels, where the
casts and the amax reductions of float8 run fused with their neighbours. It shows which matmuls gain,
which do not, and what the casts cost.

curves: per-step losses over --steps steps of the 1B shape, on the default corpus (its 8192-id tokenizer,
with validation every 50 steps) and on the learnable synthetic documents (each document counts up from a
random token; 8192 ids), for bf16 with initialization seed 0 ("bf16-a") and seed 1 ("bf16-b": their gap
is bf16's run-to-run noise) and float8 with seed 0 (the recipes named in --runs). Same data order in
every run of a workload. No run keeps a checkpoint (the disk holds one 3B checkpoint at most).

scripts/plot_benchmarks.py draws docs/img/float8_*.png from the JSON files in docs/results/.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from bench_utils import gpu_recipe, median_after_warmup, medians, meta, run_all, synthetic_loader, train

SHAPES = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b"}
RECIPES = ("bf16", "tensorwise", "tensorwise-own-cast", "rowwise")
WARMUP = 5


def config(name: str, preset: str, recipe: str, steps: int, *, seed: int = 0):
    scaling, own_cast = recipe.removesuffix("-own-cast"), recipe.endswith("-own-cast")
    float8 = {
        "float8.enabled": recipe != "bf16",
        "float8.recipe": scaling if recipe != "bf16" else "tensorwise",
        "float8.weights_from_optimizer": not own_cast,
    }
    return gpu_recipe(f"/tmp/bench_float8/{name}", steps, preset=preset, **float8, **{"trainer.seed": seed})


def float8_description(trainer) -> str:
    return next((c.description for c in trainer.converters), "bf16 autocast throughout")


def measure(shape: str, recipe: str, steps: int, peak: float | None) -> dict:
    cfg = config(f"{shape}-{recipe}", SHAPES[shape], recipe, steps)
    cfg.model.vocab_from_tokenizer = False
    run = train(cfg, synthetic_loader())
    row = {"config": f"{shape}-{recipe}", "shape": shape, "recipe": recipe, **medians(run.records, WARMUP)}
    mfu = median_after_warmup((r["mfu"] for r in run.records), WARMUP) if peak else None
    return row | {
        "mfu_bf16_peak": mfu,
        "mfu_fp8_peak": mfu / 2 if mfu is not None else None,  # Hopper's float8 dense peak is twice bf16's
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "params": run.trainer.n_params,
        "converted": float8_description(run.trainer),
        "step": run.trainer.step_impl.description,
        "losses": [r["loss"] for r in run.records],  # every step's: where two recipes' curves part
    }


def throughput(args) -> None:
    from nemo_lite.training.metrics import PEAK_BF16_FLOPS

    peak = next((f for k, f in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
    runs = {
        f"{shape}-{recipe}": (lambda s=shape, r=recipe: measure(s, r, args.steps, peak))
        for shape in args.shapes.split(",")
        for recipe in args.recipes.split(",")
    }

    def write(rows: list[dict]) -> None:
        meta_rows = {"meta": meta(), "steps": args.steps, "warmup": WARMUP, "rows": rows}
        Path(args.out).write_text(json.dumps(meta_rows, indent=1))

    rows = run_all(list(runs), runs, write)
    print(f"\n{meta()}\n")
    print("| shape-recipe | tokens/s | vs bf16 | vs own-cast | MFU (bf16 peak) | MFU (fp8 peak) | peak GiB |")
    print("|---|---|---|---|---|---|---|")

    def ratio(r: dict, recipe: str) -> str:
        base = next((b for b in rows if b.get("shape") == r["shape"] and b.get("recipe") == recipe), None)
        return f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" if base and "tokens_per_s" in base else "-"

    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['error']} | | | | | |")
            continue
        vs_own = ratio(r, f"{r['recipe']}-own-cast")
        mfu = (f"{100 * r['mfu_bf16_peak']:.1f}%", f"{100 * r['mfu_fp8_peak']:.1f}%") if r["mfu_bf16_peak"] else "--"
        print(f"| {r['config']} | {r['tokens_per_s']:.0f} | {ratio(r, 'bf16')} | {vs_own} | {mfu[0]} | {mfu[1]} | "
              f"{r['peak_mem_gib']:.1f} |")  # fmt: skip


PROFILED_STEPS = 3


def matmul_split(trace: dict, steps: int) -> dict:
    """GPU ms per step of the matmul kernels by the operator that launched them and its input shapes:
    ``aten::_scaled_mm`` is a float8 matmul, ``aten::mm``/``addmm``/``bmm`` a bf16 one. Other kernels are
    summed by kind: compiled (triton) kernels, where the float8 casts and amax reductions run fused, and
    the rest."""
    from nemo_lite.training.profiling import GPU_CATEGORIES, kernel_class

    events = [e for e in trace.get("traceEvents", []) if "dur" in e and "ts" in e]
    ops = {}
    for e in events:
        if e.get("cat") == "cpu_op" and "External id" in e.get("args", {}):
            ops[e["args"]["External id"]] = (e["name"], [d for d in e["args"].get("Input Dims") or [] if d][:2])
    by_shape: dict[str, float] = {}
    totals = {"float8 matmul": 0.0, "bf16 matmul": 0.0, "compiled (triton) other": 0.0, "rest": 0.0}
    for e in events:
        if e.get("cat") not in GPU_CATEGORIES:
            continue
        ms = e["dur"] / 1000 / steps
        name, dims = ops.get(e.get("args", {}).get("External id"), ("", []))
        if kernel_class(e["name"]) == "matmul" and name in ("aten::_scaled_mm", "aten::mm", "aten::addmm", "aten::bmm"):
            kind = "float8 matmul" if name == "aten::_scaled_mm" else "bf16 matmul"
            totals[kind] += ms
            key = f"{kind} {' x '.join(str(tuple(d)) for d in dims)}"
            by_shape[key] = by_shape.get(key, 0.0) + ms
        elif e["name"].startswith("triton_") and kernel_class(e["name"]) != "flex attention":
            totals["compiled (triton) other"] += ms
        else:
            totals["rest"] += ms
    ranked = sorted(by_shape.items(), key=lambda kv: -kv[1])
    return {"ms_per_step": {k: round(v, 2) for k, v in totals.items()},
            "matmuls_by_shape_ms_per_step": {k: round(v, 3) for k, v in ranked}}  # fmt: skip


def profile(args) -> None:
    out = {"meta": meta(), "profiled_steps": PROFILED_STEPS, "warmup": WARMUP, "rows": []}
    for shape in args.shapes.split(","):
        for recipe in args.recipes.split(","):
            cfg = config(f"profile-{shape}-{recipe}", SHAPES[shape], recipe, WARMUP + PROFILED_STEPS + 1)
            cfg.model.vocab_from_tokenizer = False
            cfg.trainer.profile_start, cfg.trainer.profile_steps = WARMUP, PROFILED_STEPS
            run = train(cfg, synthetic_loader(), keep=True)
            trainer, records = run.trainer, run.records
            prof = Path(cfg.run_dir) / "profile"
            with gzip.open(prof / "trace_rank0.json.gz", "rt") as f:
                split = matmul_split(json.load(f), PROFILED_STEPS)
            summary = json.loads((prof / "summary.json").read_text())
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
            row = {"shape": shape, "recipe": recipe, "converted": float8_description(trainer),
                   "unprofiled_step_ms": records[WARMUP - 1]["step_ms"], **split,
                   **{k: v for k, v in summary.items() if k != "top_kernels_by_operator_ms_per_step"}}  # fmt: skip
            del trainer
            gc.collect()
            torch.cuda.empty_cache()
            print(json.dumps({k: row[k] for k in ("shape", "recipe", "ms_per_step", "gpu_busy_ms_per_step")}),
                  file=sys.stderr, flush=True)  # fmt: skip
            out["rows"].append(row)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=1)


def curves(args) -> None:
    out = {"meta": meta(), "steps": args.steps, "shape": "llama-3.2-1b", "workloads": {}}
    for workload in args.workloads.split(","):
        if workload not in ("corpus", "synthetic"):
            sys.exit(f"unknown workload {workload!r}; choose corpus or synthetic")
        runs = {}
        for run in args.runs.split(","):
            runs[run] = curve(workload, run, args.steps)
            gc.collect()
            torch.cuda.empty_cache()
            print(json.dumps({"workload": workload, "run": run, **{k: v for k, v in runs[run].items() if k != "loss"}}),
                  file=sys.stderr, flush=True)  # fmt: skip
            out["workloads"][workload] = runs
            with open(args.out, "w") as f:
                json.dump(out, f)
        summarize(workload, runs)


def curve(workload: str, run: str, steps: int) -> dict:
    recipe = "bf16" if run.startswith("bf16") else run
    seed = 1 if run == "bf16-b" else 0
    t0 = time.perf_counter()
    cfg = config(f"{workload}-{run}", "llama-3.2-1b", recipe, steps, seed=seed)
    if workload == "corpus":  # the default corpus and tokenizer (8192 ids), held-out loss every 50 steps
        cfg.trainer.val_every, cfg.trainer.val_tokens = 50, 65536
        loader = None
    else:
        cfg.model.vocab_from_tokenizer = False
        cfg.model.overrides = {"vocab_size": 8192}
        loader = synthetic_loader(vocab_size=8192, eos_id=3, learnable=True)
    run = train(cfg, loader)
    trainer, records = run.trainer, run.records
    return {
        "recipe": recipe,
        "seed": seed,
        "loss": [r["loss"] for r in records],
        "val": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
        "tokens_per_s": median_after_warmup((r["tokens_per_s"] for r in records), WARMUP),
        "converted": float8_description(trainer),
        "wall_s": time.perf_counter() - t0,
    }


def summarize(workload: str, runs: dict) -> None:
    """The mean absolute gap of each run's loss to bf16-a's over the last 100 steps (and the whole curve)."""

    def gap(a, b, last=None):
        pairs = list(zip(a, b, strict=False))[-last:] if last else list(zip(a, b, strict=False))
        return sum(abs(x - y) for x, y in pairs) / max(len(pairs), 1)

    if "bf16-a" not in runs:
        return
    ref = runs["bf16-a"]["loss"]
    for run, r in runs.items():
        if run != "bf16-a":
            print(f"{workload} {run}: mean |loss - bf16-a| {gap(r['loss'], ref):.4f} (last 100 steps "
                  f"{gap(r['loss'], ref, 100):.4f}); final loss {r['loss'][-1]:.4f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--shapes", default="1b,3b")
    p.add_argument("--recipes", default="bf16,tensorwise,rowwise")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="float8_throughput.json")
    q = sub.add_parser("profile")
    q.add_argument("--shapes", default="1b,3b")
    q.add_argument("--recipes", default="bf16,tensorwise")
    q.add_argument("--out", default="float8_profile.json")
    c = sub.add_parser("curves")
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--workloads", default="corpus,synthetic")
    c.add_argument("--runs", default="bf16-a,bf16-b,tensorwise")
    c.add_argument("--out", default="float8_curves.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_float8.py needs a CUDA GPU")
    for name in getattr(args, "recipes", "").split(",") + getattr(args, "runs", "").split(","):
        if name and name not in (*RECIPES, "bf16-a", "bf16-b"):
            sys.exit(f"unknown recipe or run {name!r}; choose from {', '.join(RECIPES)} (runs: bf16-a, bf16-b)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # several models and recipes in one process
    {"throughput": throughput, "profile": profile, "curves": curves}[args.mode](args)


if __name__ == "__main__":
    main()
