"""Loss curve of a run directory (its metrics.jsonl):

python scripts/plot_loss.py runs/pretrain docs/img/pretrain_loss.png
python scripts/plot_loss.py runs/pretrain          # -> runs/pretrain/loss.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nemo_lite.training.metrics import read_metrics  # noqa: E402


def main(run_dir: str, out: str) -> None:
    records = read_metrics(run_dir)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="train loss", linewidth=1)
    val = [r for r in records if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir}: {len(records)} steps")
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Plot the train and validation loss of a run directory.")
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl (e.g. runs/pretrain)")
    parser.add_argument("out", nargs="?", default=None, help="the image to write (default: RUN_DIR/loss.png)")
    args = parser.parse_args()
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        parser.error(f"{args.run_dir} has no metrics.jsonl (give the run_dir of a training run)")
    main(args.run_dir, args.out or str(Path(args.run_dir) / "loss.png"))
