"""Figures for docs/float8.md from the JSON that scripts/bench_float8.py writes.

python scripts/plot_float8.py [--throughput docs/results/float8_throughput.json]
    [--curves docs/results/float8_curves.json] [--out docs/img]

Writes float8_throughput.png (tokens/s and MFU per shape and recipe) and float8_loss_<workload>.png for
each workload (the loss curves, and below them each run's gap to bf16 seed A, next to bf16 seed B's gap:
the run-to-run noise the float8 gap is judged against). A file that is missing is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"bf16": "#555555", "bf16-a": "#555555", "bf16-b": "#aaaaaa", "tensorwise": "#1f77b4", "rowwise": "#d62728"}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_throughput(path: Path, out: Path) -> None:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "error" not in r]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    width = 0.8 / max(len(recipes), 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for j, recipe in enumerate(recipes):
        xs = [i + (j - (len(recipes) - 1) / 2) * width for i in range(len(shapes))]
        got = {r["shape"]: r for r in rows if r["recipe"] == recipe}
        tps = [got[s]["tokens_per_s"] / 1e3 if s in got else 0 for s in shapes]
        bars = ax1.bar(xs, tps, width, label=recipe, color=COLORS.get(recipe))
        base = {r["shape"]: r["tokens_per_s"] for r in rows if r["recipe"] == "bf16"}
        labels = [f"{got[s]['tokens_per_s'] / base[s]:.2f}x" if s in got and s in base else "" for s in shapes]
        ax1.bar_label(bars, labels, fontsize=8)
        mfu = [100 * (got[s]["mfu_bf16_peak"] or 0) if s in got else 0 for s in shapes]
        ax2.bar(xs, mfu, width, label=recipe, color=COLORS.get(recipe))
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(shapes)), [f"Llama-3.2-{s.upper()}" for s in shapes])
        ax.legend()
    ax1.set_ylabel("thousand tokens/s")
    ax1.set_title("training throughput (label: against bf16)")
    ax2.set_ylabel("MFU against the bf16 dense peak (%)")
    ax2.set_title("MFU (against the float8 peak: half of this)")
    meta = data["meta"]
    fig.suptitle(f"2x4096 packed tokens, flex, compiled, fast step; {meta['card']}, torch {meta['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_curves(path: Path, out_dir: Path, window: int) -> None:
    data = json.loads(path.read_text())
    for workload, runs in data["workloads"].items():
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 2])
        for run, r in runs.items():
            steps = range(1, len(r["loss"]) + 1)
            ax1.plot(steps, smooth(r["loss"], window), label=run, color=COLORS.get(run), linewidth=1.2)
            if r.get("val"):
                ax1.plot(*zip(*r["val"], strict=True), "o", color=COLORS.get(run), markersize=3)
        ref = runs.get("bf16-a")
        if ref is not None:
            for run, r in runs.items():
                if run == "bf16-a":
                    continue
                gap = [abs(a - b) for a, b in zip(r["loss"], ref["loss"], strict=False)]
                ax2.plot(range(1, len(gap) + 1), smooth(gap, window), label=f"|{run} - bf16-a|", color=COLORS.get(run))
            ax2.set_ylabel(f"loss gap ({window}-step mean)")
            ax2.legend()
        ax1.set_ylabel(f"train loss ({window}-step mean; dots: validation)")
        ax1.legend()
        ax2.set_xlabel("step")
        name = {"corpus": "default corpus", "synthetic": "learnable synthetic documents"}.get(workload, workload)
        meta = data["meta"]
        ax1.set_title(f"Llama-3.2-1B shape, {name}, 2x4096 tokens/step; {meta['card']}", fontsize=10)
        fig.tight_layout()
        out = out_dir / f"float8_loss_{workload}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput", default="docs/results/float8_throughput.json")
    parser.add_argument("--curves", default="docs/results/float8_curves.json")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--window", type=int, default=10, help="steps averaged in the plotted curves")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path, plot in ((Path(args.throughput), None), (Path(args.curves), "curves")):
        if not path.is_file():
            print(f"{path} is missing: skipped")
        elif plot is None:
            plot_throughput(path, out / "float8_throughput.png")
        else:
            plot_curves(path, out, args.window)


if __name__ == "__main__":
    main()
