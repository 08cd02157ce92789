"""Figures for docs/float8.md from the JSON that scripts/bench_float8.py writes.

python scripts/plot_float8.py [--throughput docs/results/float8_throughput.json]
    [--curves docs/results/float8_curves.json] [--profile docs/results/float8_profile_*_h200.json ...]
    [--out docs/img]

Writes float8_throughput.png (tokens/s and MFU per shape and recipe) and float8_loss_<workload>.png for
each workload (the loss curves, and below them each run's gap to bf16 seed A, next to bf16 seed B's gap:
the run-to-run noise the float8 gap is judged against), and float8_profile.png from the profile files (GPU
time per step by kind of kernel, bf16 against float8, per shape). A file that is missing is skipped with
a note.
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


PROFILE_PARTS = [  # (label, color): the stacked segments of float8_profile.png
    ("float8 matmul", "#1f77b4"),
    ("bf16 matmul", "#555555"),
    ("compiled elementwise\n(float8 casts, norms, ...)", "#ff7f0e"),
    ("flex attention", "#2ca02c"),
    ("AdamW", "#9467bd"),
    ("other", "#cccccc"),
]


def profile_parts(row: dict) -> list[float]:
    """GPU ms per step of one profiled run, in the order of PROFILE_PARTS."""
    split, by_class = row["ms_per_step"], row["ms_per_step_by_class"]
    known = [
        split["float8 matmul"],
        split["bf16 matmul"],
        split["compiled (triton) other"],
        by_class.get("flex attention", 0.0),
        by_class.get("adamw", 0.0),
    ]
    return [*known, max(sum(by_class.values()) - sum(known), 0.0)]


def plot_profile(paths: list[Path], out: Path) -> None:
    rows = [r for p in paths for r in json.loads(p.read_text())["rows"]]
    meta = json.loads(paths[0].read_text())["meta"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(len(shapes), 1, figsize=(10, 1.6 + 1.3 * len(shapes)), squeeze=False)
    for ax, shape in zip(axes[:, 0], shapes, strict=True):
        runs = [r for r in rows if r["shape"] == shape]
        for y, r in enumerate(runs):
            left = 0.0
            for (label, color), ms in zip(PROFILE_PARTS, profile_parts(r), strict=True):
                ax.barh([y], [ms], left=left, color=color, label=label if y == 0 else None)
                if ms > 8:
                    ax.text(left + ms / 2, y, f"{ms:.0f}", ha="center", va="center", fontsize=7, color="white")
                left += ms
            ax.text(left + 2, y, f"{left:.0f} ms", va="center", fontsize=8)
        ax.set_yticks(range(len(runs)), [r["recipe"] for r in runs])
        ax.set_title(f"Llama-3.2-{shape.upper()} shape, 2 x 4096 tokens: GPU time per step (ms)", fontsize=9)
        ax.invert_yaxis()
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=len(PROFILE_PARTS), loc="lower center")
    fig.suptitle(f"{meta['card']}, torch {meta['torch']}, {meta['date']} (profiled steps)", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--throughput", default="docs/results/float8_throughput.json")
    parser.add_argument("--curves", default="docs/results/float8_curves.json")
    parser.add_argument(
        "--profile",
        nargs="*",
        default=["docs/results/float8_profile_1b_h200.json", "docs/results/float8_profile_3b_h200.json"],
    )
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
    profiles = [Path(p) for p in args.profile if Path(p).is_file()]
    for missing in sorted(set(args.profile) - {str(p) for p in profiles}):
        print(f"{missing} is missing: skipped")
    if profiles:
        plot_profile(profiles, out / "float8_profile.png")


if __name__ == "__main__":
    main()
