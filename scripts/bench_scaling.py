"""Data-parallel scaling: 1 GPU against N GPUs (FSDP2) with the same global batch, repeated, in one call.

    python scripts/bench_scaling.py --gpus 2 --rows 16 --out results.json       # ~9 minutes on 2 x H200
    python scripts/bench_scaling.py --gpus 4 --rows 32 --one-gpu-accum 2 --out results.json
    python scripts/bench_scaling.py --gpus 2 --no-compile --model tiny --seq-len 256 --steps 8 --warmup 3 \\
        --device cpu --out /tmp/s.json                                          # a CPU dry run of the script

One optimizer step over ``--rows`` rows of ``--seq-len`` tokens (Llama-3.2-1B shape, flex attention,
compiled blocks, the fast step, lr 3e-4, the default corpus): one GPU with all the rows (``--one-gpu-accum K``:
in K micro-batches, where they do not fit) against N GPUs with ``rows / N`` each. Both do the same arithmetic,
so the losses agree within bf16 noise and only the speed differs. Every run is a fresh ``torchrun`` launch of
this script as a worker, which times ``Trainer.train_step`` (no checkpoint). tokens/s of a run: the median
over the steps after ``--warmup`` of the trainer's figure. The 1-GPU and the N-GPU ``--main`` configuration
run ``--repeats`` times, interleaved; scaling is the N-GPU median over the 1-GPU median, its spread that of the
single N-GPU runs. ``--variants`` (other N-GPU configurations) run afterwards while ``--budget-s`` lasts. A
configuration is a comma-separated list of the names in VARIANTS (recipe keys, environment variables).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (trainer keys, environment). The launcher's NCCL_NVLS_ENABLE=0 and
# TORCH_SYMM_MEM_DISABLE_MULTICAST=1 are inherited by every run and never changed here.
VARIANTS: dict[str, tuple[dict, dict]] = {
    # Keep each block's gathered bf16 parameters from forward to backward: no all-gather in backward.
    "reshard_false": ({"reshard_after_forward": False}, {}),
    # Start the next block's all-gather when a block's forward starts, not when the host reaches the next
    # block (the forward is host-bound at small per-GPU batches: the GPU waits for each all-gather).
    "prefetch1": ({"fsdp_prefetch": 1}, {}),
    "prefetch2": ({"fsdp_prefetch": 2}, {}),
    # NCCL's Simple protocol (NCCL picked LL on the 2 x H200 host; Simple measured 1.5% faster there).
    "nccl_simple": ({}, {"NCCL_PROTO": "Simple"}),
    # Fewer NCCL thread blocks: fewer SMs taken from the matmuls the collectives overlap with.
    "nccl_ctas8": ({}, {"NCCL_MAX_CTAS": "8"}),
    "nccl_ctas4": ({}, {"NCCL_MAX_CTAS": "4"}),
}


def parse_variant(spec: str) -> tuple[dict, dict]:
    keys, env = {}, {}
    for name in filter(None, spec.split(",")):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from: {', '.join(VARIANTS)}")
        keys.update(VARIANTS[name][0])
        env.update(VARIANTS[name][1])
    return keys, env


# ---- the worker: one run under torchrun ----------------------------------------------------------------


def worker(spec: dict) -> None:
    import torch
    import yaml
    from bench_utils import gpu_recipe

    from nemo_lite.training import distributed
    from nemo_lite.training.trainer import Trainer

    info = distributed.init_distributed()
    accum = spec["one_gpu_accum"] if info.world_size == 1 else 1
    keys = {f"trainer.{key}": value for key, value in spec["keys"].items()}
    model_yaml = yaml.safe_load((REPO / "configs" / "model" / f"{spec['model']}.yaml").read_text())
    keys |= {f"model.{key}": value for key, value in model_yaml.items()}  # as the recipe's model=<name> group
    keys |= {"attention.backend": spec["attention"], "optim.lr": 3e-4, "optim.warmup_steps": 20}
    keys |= {"data.seq_len": spec["seq_len"], "data.batch_size": spec["rows"] // info.world_size // accum}
    keys |= {"trainer.device": spec["device"], "trainer.compile": spec["compile"], "trainer.grad_accum": accum}
    cfg = gpu_recipe(spec["run_dir"], spec["steps"], preset=None, recipe="bench_scaling", **keys)
    trainer = Trainer(cfg, dist_info=info)
    trainer.setup()
    trainer.model.train()
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    records, t_start = [], None
    for step in range(spec["steps"]):
        if step == spec["warmup"]:
            sync()
            t_start = time.perf_counter()
        metrics = trainer.train_step(trainer._next_micro_batches())
        trainer.step += 1
        records.append({k: metrics.get(k) for k in ("loss", "tokens_per_s", "step_ms", "mfu", "peak_mem_gib")})
    sync()
    wall = time.perf_counter() - t_start
    timed = spec["steps"] - spec["warmup"]
    if info.rank == 0:
        result = {
            "steps": records,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[spec["warmup"] :]),
            "tokens_per_s_wall": timed * spec["rows"] * spec["seq_len"] / wall,
            "mfu": statistics.median(r["mfu"] for r in records[spec["warmup"] :])
            if records[-1]["mfu"] is not None
            else None,
            "peak_mem_gib": max((r["peak_mem_gib"] or 0.0) for r in records),
            "step_description": trainer.step_impl.description,
        }
        Path(spec["out"]).write_text(json.dumps(result))
    distributed.shutdown()


# ---- the driver ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args, gpus: int, keys: dict, env: dict, label: str, index: int) -> dict:
    run_dir = Path(args.root) / f"{label}_{index}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    spec = {
        "rows": args.rows,
        "seq_len": args.seq_len,
        "model": args.model,
        "attention": args.attention,
        "device": args.device,
        "compile": not args.no_compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "keys": keys,
        "one_gpu_accum": args.one_gpu_accum,
        "run_dir": str(run_dir),
        "out": str(run_dir / "result.json"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus)]
    cmd += ["--master-port", str(free_port()), __file__, "--worker", json.dumps(spec)]
    child_env = {
        **os.environ,
        **env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, env=child_env)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        print(f"{label} #{index} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
        return {"label": label, "repeat": index, "gpus": gpus, "failed": proc.stderr[-3000:], "seconds": seconds}
    result = json.loads((run_dir / "result.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    out = {"label": label, "repeat": index, "gpus": gpus, "rows_per_gpu": args.rows // gpus, "keys": keys}
    out |= {"env": env, "seconds": seconds, **result}
    print(
        f"{label} #{index}: {gpus} GPU(s) x {args.rows // gpus} rows: {out['tokens_per_s']:.0f} tokens/s "
        f"(wall {out['tokens_per_s_wall']:.0f}), launch {seconds:.0f} s",
        flush=True,
    )
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarize(runs: list[dict], reference: float | None) -> dict | None:
    ok = [r for r in runs if "failed" not in r]
    if not ok:
        return None
    out = {
        "runs": len(ok),
        "failed": len(runs) - len(ok),
        "gpus": ok[0]["gpus"],
        "rows_per_gpu": ok[0]["rows_per_gpu"],
        "keys": ok[0]["keys"],
        "env": ok[0]["env"],
        "tokens_per_s": spread([r["tokens_per_s"] for r in ok]),
        "tokens_per_s_wall": spread([r["tokens_per_s_wall"] for r in ok]),
        "mfu": statistics.median(r["mfu"] for r in ok) if ok[0]["mfu"] is not None else None,
        "peak_mem_gib": max(r["peak_mem_gib"] for r in ok),
    }
    if reference:
        tps = out["tokens_per_s"]
        out["scaling"] = {k: tps[k] / reference for k in ("median", "min", "max")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8, help="global batch in rows (each GPU gets rows / gpus)")
    parser.add_argument(
        "--one-gpu-accum",
        type=int,
        default=1,
        help="the 1-GPU run takes the global batch in this many micro-batches (when rows do not fit one GPU)",
    )
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--attention", default="flex")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the medians")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--main", default="reshard_false,nccl_simple,prefetch1", help="the N-GPU configuration")
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[
            "reshard_false",
            "reshard_false,nccl_simple",
            "reshard_false,prefetch1",
            "reshard_false,nccl_simple,prefetch1,nccl_ctas8",
        ],
        help="other N-GPU configurations, run after the main comparison while the budget lasts",
    )
    parser.add_argument("--variant-repeats", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=500, help="no run starts that would end after this")
    parser.add_argument("--root", default="/tmp/bench_scaling")
    parser.add_argument("--out", required=False)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.rows % args.gpus:
        parser.error(f"--rows {args.rows} must be a multiple of --gpus {args.gpus} (the same global batch)")
    if args.one_gpu_accum < 1 or args.rows % args.one_gpu_accum:
        parser.error(f"--one-gpu-accum {args.one_gpu_accum} must be a positive divisor of --rows {args.rows}")
    from bench_utils import meta

    start = time.perf_counter()
    # gpus -> the last launch's seconds: the estimate of the next one (the first of each GPU count compiles
    # its shapes, later ones find inductor's cache)
    last: dict[int, float] = {}

    def fits(gpus: int) -> bool:
        return time.perf_counter() - start + last.get(gpus, max(last.values(), default=0.0)) < args.budget_s

    def run(gpus: int, keys: dict, env: dict, label: str, index: int) -> dict | None:
        if not fits(gpus):
            print(f"{label} #{index}: skipped (budget of {args.budget_s:.0f} s)", flush=True)
            return None
        out = launch(args, gpus, keys, env, label, index)
        last[gpus] = out["seconds"]
        return out

    main_keys, main_env = parse_variant(args.main)
    one, many = [], []
    for i in range(args.repeats):  # interleaved, so a drift of the host touches both alike
        one.append(run(1, {}, {}, "1gpu", i))
        many.append(run(args.gpus, main_keys, main_env, "main", i))
    one, many = [r for r in one if r], [r for r in many if r]
    summary_one = summarize(one, None)
    reference = summary_one["tokens_per_s"]["median"] if summary_one else None
    variants = {}
    for spec in args.variants:
        keys, env = parse_variant(spec)
        runs = [r for i in range(args.variant_repeats) if (r := run(args.gpus, keys, env, spec, i))]
        variants[spec] = {"summary": summarize(runs, reference), "runs": runs}

    losses_one = [s["loss"] for s in one[0]["steps"]] if one and "steps" in one[0] else []
    losses_many = [s["loss"] for s in many[0]["steps"]] if many and "steps" in many[0] else []
    diffs = [abs(a - b) for a, b in zip(losses_one, losses_many, strict=False)]
    result = {
        **meta(),
        "compared": (
            f"one optimizer step over {args.rows} rows x {args.seq_len} tokens: 1 GPU x {args.rows} rows"
            f"{f' in {args.one_gpu_accum} micro-batches' if args.one_gpu_accum > 1 else ''} vs "
            f"{args.gpus} GPUs x {args.rows // args.gpus} rows (FSDP2), {args.model}, {args.attention}, "
            f"compile={not args.no_compile}; tokens/s = median over steps {args.warmup + 1}-{args.steps}"
        ),
        "gpus": args.gpus,
        "rows": args.rows,
        "seq_len": args.seq_len,
        "main": args.main,
        "one_gpu": summary_one,
        "n_gpus": summarize(many, reference),
        "variants": variants,
        "loss_max_abs_diff_first_pair": max(diffs) if diffs else None,
        "runs": {"one_gpu": one, "n_gpus": many},
        "seconds": time.perf_counter() - start,
        "env_kept": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST")},
    }
    brief = {k: result[k] for k in ("compared", "one_gpu", "n_gpus", "loss_max_abs_diff_first_pair", "seconds")}
    brief["variants"] = {k: v["summary"] for k, v in variants.items()}
    print(json.dumps(brief, indent=1, default=str))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
