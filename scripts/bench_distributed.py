"""FSDP2 on N GPUs of one host against one GPU with the same global batch, then an exact resume.

    python scripts/bench_distributed.py --gpus 2 [--steps 50] [--out results.json]

Runs recipes/pretrain.py three times on the Llama-3.2-1B shape (default corpus, 4096 tokens a row,
compiled blocks): 1 rank x (N*B) rows, N ranks x B rows, and N ranks resumed from the middle
checkpoint of the second run. Prints the loss agreement, the throughput ratio and the resume check.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run(nproc: int, run_dir: Path, batch: int, steps: int, *extra: str, save: bool = True) -> list[dict]:
    args = [
        "model=llama-3.2-1b",
        "attention=flex",
        "data.seq_len=4096",
        f"data.batch_size={batch}",
        f"trainer.max_steps={steps}",
        f"trainer.save_every={steps // 2 if save else 0}",
        "trainer.keep_last=2",
        "trainer.val_every=0",
        "trainer.compile=true",
        "trainer.export_hf=false",
        "trainer.sample_tokens=0",
        "trainer.progress_bar=false",
        "optim.lr=3e-4",
        f"run_dir={run_dir}",
        *extra,
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "recipes/pretrain.py"]
    proc = subprocess.run([*cmd, *args], cwd=REPO, text=True, capture_output=True)
    if proc.returncode:
        sys.exit(f"run failed ({' '.join(cmd + args)}):\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
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
    args = parser.parse_args()
    root = Path(args.root)
    n, b, steps = args.gpus, args.batch, args.steps
    reshard = f"trainer.reshard_after_forward={args.reshard_after_forward}"

    one = run(1, root / "one", n * b, steps)
    shutil.rmtree(root / "one" / "checkpoints")  # 15 GB a checkpoint at this size: keep the disk free
    print(f"1 GPU x {n * b} rows: {[round(r['loss'], 4) for r in one]}", flush=True)
    many = run(n, root / "many", b, steps, reshard)
    print(f"{n} GPUs x {b} rows: {[round(r['loss'], 4) for r in many]}", flush=True)
    for label, records in (("1 GPU", one), (f"{n} GPUs", many)):
        print(f"{label}: {statistics.median(r['tokens_per_s'] for r in records[5:]):.0f} tokens/s", flush=True)
    middle = root / "many" / "checkpoints" / f"step_{steps // 2:06d}"
    resumed = run(n, root / "resumed", b, steps, reshard, f"trainer.resume={middle}")
    shutil.rmtree(root / "many" / "checkpoints")
    other = None
    if args.compare_reshard:
        flipped = "false" if args.reshard_after_forward == "true" else "true"
        other = run(n, root / "other", b, 20, f"trainer.reshard_after_forward={flipped}", save=False)  # throughput only

    profiles = {}
    if args.profile:  # separate short runs, so the profiler does not touch the throughput above
        prof_args = ("trainer.profile_start=6", "trainer.profile_steps=3")
        for label, nproc, rows, extra in (("one", 1, n * b, ()), ("n", n, b, (reshard,))):
            run(nproc, root / f"profile_{label}", rows, 12, *extra, *prof_args, save=False)
            profiles[label] = json.loads((root / f"profile_{label}" / "profile" / "summary.json").read_text())
            shutil.rmtree(root / f"profile_{label}" / "checkpoints", ignore_errors=True)  # the final one, 15 GB
            print(f"profile {label}: {json.dumps(profiles[label], indent=1)}", flush=True)

    diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(one, many, strict=True)]
    resume_diffs = [abs(x["loss"] - y["loss"]) for x, y in zip(many[steps // 2 :], resumed, strict=True)]
    tps_one = statistics.median(r["tokens_per_s"] for r in one[5:])
    tps_many = statistics.median(r["tokens_per_s"] for r in many[5:])
    result = {
        "card": torch.cuda.get_device_name(),
        "gpus": n,
        "torch": torch.__version__,
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "loss_max_abs_diff": max(diffs),
        "loss_first_diff": diffs[0],
        "loss_last5_mean_diff": statistics.mean(diffs[-5:]),
        "tokens_per_s_one_gpu": tps_one,
        "tokens_per_s_n_gpus": tps_many,
        "scaling": tps_many / tps_one,
        "reshard_after_forward": args.reshard_after_forward,
        "tokens_per_s_n_gpus_other_reshard": statistics.median(r["tokens_per_s"] for r in other[5:]) if other else None,
        "mfu_one": statistics.median(r["mfu"] for r in one[5:]),
        "mfu_n": statistics.median(r["mfu"] for r in many[5:]),
        "resume_max_abs_diff": max(resume_diffs),
        "profiles": profiles or None,
        "resume_steps_compared": len(resume_diffs),
        "losses_one": [r["loss"] for r in one],
        "losses_n": [r["loss"] for r in many],
        "losses_resumed": [r["loss"] for r in resumed],
    }
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("losses")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
