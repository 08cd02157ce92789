"""Step time of the default pretraining recipe on the CPU, per attention backend, side by side in one process.

    python scripts/bench_cpu_backends.py [--steps 20] [--backends flex,sdpa] [--rounds 2] [--out r.json]

Each round trains every backend for ``--steps`` steps of ``configs/pretrain.yaml`` (validation, export and
sampling off), in turn, so that a busy machine slows all of them alike. Reported: the median step time
over steps 3 onwards, per backend and round, and each backend's ratio to the last one listed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench_utils import median_after_warmup, meta, train

REPO = Path(__file__).resolve().parents[1]


def step_ms(backend: str, steps: int, run_dir: str) -> float:
    from hydra import compose, initialize_config_dir

    from nemo_lite.training.config import register_schema

    register_schema()
    overrides = [
        f"attention={backend}",
        f"trainer.max_steps={steps}",
        f"run_dir={run_dir}",
        "trainer.val_every=0",
        "trainer.save_every=0",
        "trainer.export_hf=false",
        "trainer.sample_tokens=0",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="pretrain", overrides=overrides)
    return median_after_warmup((r["step_ms"] for r in train(cfg).records), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backends", default="flex,sdpa")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    backends = args.backends.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for backend in backends:
                ms = step_ms(backend, args.steps, f"{tmp}/{backend}_{round_}")
                rows.append({"round": round_, "backend": backend, "median_step_ms": ms})
                print(json.dumps(rows[-1]), flush=True)
    medians = {b: statistics.median(r["median_step_ms"] for r in rows if r["backend"] == b) for b in backends}
    base = medians[backends[-1]]
    summary = {b: {"median_step_ms": ms, f"vs_{backends[-1]}": ms / base} for b, ms in medians.items()}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta(), "rows": rows, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    main()
