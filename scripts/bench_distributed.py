"""FSDP2 on N GPUs of one host against one GPU with the same global batch, then an exact resume.

    python scripts/bench_distributed.py --gpus 2 --batch 4 [--steps 50] [--more-gpus 4] [--out results.json]

Runs recipes/pretrain.py on the Llama-3.2-1B shape (default corpus, 4096 tokens a row, compiled
blocks): 1 rank x (N*B) rows, N ranks x B rows, and N ranks resumed from the middle checkpoint of the
second run; with --more-gpus M, M ranks x (N*B/M) rows too. Prints the loss agreement, the throughput
ratios and the resume check. --profile-only takes a kernel profile of the 1-rank and N-rank runs.
--step-impl picks the training step of every run (``trainer.step_impl``: auto, fast or plain); other recipe
keys go through --set (e.g. ``--set ++attention.options.kernel_options=torch``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench_utils import median_after_warmup, meta

REPO = Path(__file__).resolve().parents[1]
OVERRIDES: list[str] = []  # for every run: --model, --seq-len, --no-compile, --step-impl, --set
WARMUP_STEPS = 5  # left out of the medians (compilation, allocator warm-up)


def run(
    nproc: int, run_dir: Path, batch: int, steps: int, *extra: str, save: bool = True, env: dict | None = None
) -> list[dict]:
    args = [
        "attention=flex",
        f"data.batch_size={batch}",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={steps // 2 if save else 0}",
        "trainer.keep_last=3",  # the middle checkpoint survives an odd step count (saves at S//2, 2*(S//2), S)
        "trainer.val_every=0",
        "trainer.export_hf=false",
        "trainer.sample_tokens=0",
        "trainer.progress_bar=false",
        "optim.lr=3e-4",
        f"run_dir={run_dir}",
        *OVERRIDES,
        *extra,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "recipes/pretrain.py"]
    proc = subprocess.run([*cmd, *args], cwd=REPO, text=True, capture_output=True, env={**os.environ, **(env or {})})
    if proc.returncode:
        sys.exit(f"run failed ({' '.join(cmd + args)}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def steady(records: list[dict], key: str) -> float | None:
    """The median of a metric over the steps after warm-up; None where the run does not report it (MFU
    off GPU)."""
    values = [r.get(key) for r in records]
    if len(values) <= WARMUP_STEPS or any(v is None for v in values[WARMUP_STEPS:]):
        return None
    return median_after_warmup(values, WARMUP_STEPS)


def profile_runs(root: Path, n: int, b: int, reshard: str) -> dict:
    """12-step runs of 1 rank x (N*B) rows and N ranks x B rows, profiling steps 7-9 (kernel summary).

    Separate from the timed runs so the profiler does not touch their throughput.
    """
    profiles = {}
    prof_args = ("trainer.profile_start=6", "trainer.profile_steps=3")
    for label, nproc, rows, extra in (("one", 1, n * b, ()), ("n", n, b, (reshard,))):
        records = run(nproc, root / f"profile_{label}", rows, 12, *extra, *prof_args, save=False)
        profiles[label] = json.loads((root / f"profile_{label}" / "profile" / "summary.json").read_text())
        profiles[label]["tokens_per_s_unprofiled_steps"] = statistics.median(r["tokens_per_s"] for r in records[3:6])
        shutil.rmtree(root / f"profile_{label}" / "checkpoints", ignore_errors=True)  # the final one, 15 GB
        print(f"profile {label}: {json.dumps(profiles[label], indent=1)}", flush=True)
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--no-compile", action="store_true", help="eager blocks (a CPU dry run of this script)")
    parser.add_argument("--batch", type=int, default=2, help="rows per rank in the N-rank run")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--root", default="/tmp/bench_distributed")
    parser.add_argument("--out", default=None)
    parser.add_argument("--reshard-after-forward", choices=["true", "false"], default="true")
    parser.add_argument(
        "--compare-reshard", action="store_true", help="one more N-rank run with the other reshard setting"
    )
    parser.add_argument(
        "--profile", action="store_true", help="12-step runs of 1 and N ranks profiling steps 7-9 (kernel summary)"
    )
    parser.add_argument(
        "--more-gpus",
        default="",
        help="comma-separated rank counts run after the main check with the same global batch (N*B rows), "
        "compared with the same 1-GPU run: losses and throughput, no resume",
    )
    parser.add_argument("--skip-resume", action="store_true", help="no resume check (throughput and losses only)")
    parser.add_argument(
        "--compare-env",
        default=None,
        metavar="KEY=VALUE",
        help="one more N-rank run with this environment variable set, e.g. NCCL_PROTO=Simple (throughput only)",
    )
    parser.add_argument("--profile-only", action="store_true", help="only the --profile runs, no comparison")
    parser.add_argument(
        "--step-impl", choices=["auto", "fast", "plain"], default="auto", help="trainer.step_impl of every run"
    )
    parser.add_argument("--set", nargs="*", default=[], help="extra recipe overrides for every run (key=value)")
    args = parser.parse_args()
    root = Path(args.root)
    n, b, steps = args.gpus, args.batch, args.steps
    reshard = f"trainer.reshard_after_forward={args.reshard_after_forward}"
    OVERRIDES.extend(
        [
            f"model={args.model}",
            f"data.seq_len={args.seq_len}",
            f"trainer.compile={not args.no_compile}".lower(),
            f"trainer.step_impl={args.step_impl}",
        ]
    )
    OVERRIDES.extend(args.set)
    header = {**meta(), "gpus": n, "step_impl": args.step_impl}
    if args.profile_only:
        profiles = profile_runs(root, n, b, reshard)
        if args.out:
            Path(args.out).write_text(json.dumps({**header, "profiles": profiles}, indent=1))
        return

    more = [int(m) for m in args.more_gpus.split(",") if m]
    for m in more:
        if (n * b) % m:
            parser.error(f"--more-gpus {m} does not divide the global batch of {n * b} rows")
    one = run(1, root / "one", n * b, steps, save=False)
    shutil.rmtree(root / "one" / "checkpoints")  # 15 GB a checkpoint at this size: keep the disk free
    print(f"1 GPU x {n * b} rows: {[round(r['loss'], 4) for r in one]}", flush=True)
    many = run(n, root / "many", b, steps, reshard, save=not args.skip_resume)
    print(f"{n} GPUs x {b} rows: {[round(r['loss'], 4) for r in many]}", flush=True)
    for label, records in (("1 GPU", one), (f"{n} GPUs", many)):
        print(f"{label}: {steady(records, 'tokens_per_s'):.0f} tokens/s", flush=True)
    middle = root / "many" / "checkpoints" / f"step_{steps // 2:06d}"
    resumed = [] if args.skip_resume else run(n, root / "resumed", b, steps, reshard, f"trainer.resume={middle}")
    shutil.rmtree(root / "many" / "checkpoints")
    other = None
    if args.compare_reshard:
        flipped = "false" if args.reshard_after_forward == "true" else "true"
        other = run(n, root / "other", b, 20, f"trainer.reshard_after_forward={flipped}", save=False)  # throughput only
    env_run = None
    if args.compare_env:
        key, _, value = args.compare_env.partition("=")
        env_run = run(n, root / "env", b, 20, reshard, save=False, env={key: value})
        shutil.rmtree(root / "env" / "checkpoints", ignore_errors=True)
        print(f"{n} GPUs x {b} rows, {args.compare_env}: {steady(env_run, 'tokens_per_s'):.0f} tokens/s")

    scaling_more = {}
    for m in more:
        records = run(m, root / f"more_{m}", n * b // m, steps, reshard)
        shutil.rmtree(root / f"more_{m}" / "checkpoints")
        m_diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(one, records, strict=True)]
        tps = steady(records, "tokens_per_s")
        scaling_more[m] = {
            "rows_per_rank": n * b // m,
            "tokens_per_s": tps,
            "scaling": tps / steady(one, "tokens_per_s"),
            "mfu": steady(records, "mfu"),
            "loss_max_abs_diff": max(m_diffs),
            "loss_last5_mean_diff": statistics.mean(m_diffs[-5:]),
            "losses": [r["loss"] for r in records],
        }
        print(f"{m} GPUs x {n * b // m} rows: {tps:.0f} tokens/s", flush=True)

    profiles = profile_runs(root, n, b, reshard) if args.profile else {}

    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(one, many, strict=True)]
    resume_diffs = (
        [abs(x["loss"] - y["loss"]) for x, y in zip(many[steps // 2 :], resumed, strict=True)] if resumed else []
    )
    tps_one = steady(one, "tokens_per_s")
    tps_many = steady(many, "tokens_per_s")
    result = {
        **header,
        "loss_max_abs_diff": max(diffs),
        "loss_first_diff": diffs[0],
        "loss_last5_mean_diff": statistics.mean(diffs[-5:]),
        "tokens_per_s_one_gpu": tps_one,
        "tokens_per_s_n_gpus": tps_many,
        "scaling": tps_many / tps_one,
        "reshard_after_forward": args.reshard_after_forward,
        "tokens_per_s_n_gpus_other_reshard": steady(other, "tokens_per_s") if other else None,
        "mfu_one": steady(one, "mfu"),
        "mfu_n": steady(many, "mfu"),
        "peak_mem_gib_one": max(r.get("peak_mem_gib", 0.0) for r in one),
        "peak_mem_gib_n": max(r.get("peak_mem_gib", 0.0) for r in many),
        "compare_env": args.compare_env,
        "tokens_per_s_n_gpus_compare_env": steady(env_run, "tokens_per_s") if env_run else None,
        "resume_max_abs_diff": max(resume_diffs) if resume_diffs else None,
        "profiles": profiles or None,
        "more_gpus": scaling_more or None,
        "resume_steps_compared": len(resume_diffs),
        "losses_one": [r["loss"] for r in one],
        "losses_n": [r["loss"] for r in many],
        "losses_resumed": [r["loss"] for r in resumed],
    }
    shown = {k: v for k, v in result.items() if not k.startswith("losses") and k != "more_gpus"}
    shown["more_gpus"] = {m: {k: v for k, v in r.items() if k != "losses"} for m, r in scaling_more.items()}
    print(json.dumps(shown, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
