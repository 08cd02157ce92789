"""Plots for docs/benchmarks.md from the JSON the benchmark scripts write (docs/results/).

python scripts/plot_benchmarks.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path("docs/results")
IMG = Path("docs/img")


def plot_train(path: Path, out: Path) -> None:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "error" not in r]
    names = [r["config"] for r in rows]
    colors = ["#999999" if n.startswith("hf-") else "#1f77b4" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [r["tokens_per_s"] / 1e3 for r in rows], color=colors)
    ax1.set_ylabel("thousand tokens/s")
    ax1.set_title("training throughput")
    ax2.bar(names, [100 * r["mfu"] for r in rows], color=colors)
    ax2.axhline(50, color="red", linestyle="--", linewidth=1, label="50% target")
    ax2.set_ylabel("MFU (%)")
    ax2.set_title("model FLOPs utilization")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(
        f"Llama-3.2-1B shape, 2x4096 packed tokens, {data['meta']['card']}, torch {data['meta']['torch']}"
        " (grey: transformers)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_attention(path: Path, out: Path) -> None:
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "fwd_bwd_ms" in r and r["backend"] != "flex (again)"]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(backends)
    for i, backend in enumerate(backends):
        values = [
            next((r["fwd_bwd_ms"] for r in rows if r["shape"] == s and r["backend"] == backend), 0) for s in shapes
        ]
        ax.bar([x + i * width for x in range(len(shapes))], values, width, label=backend)
    ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(shapes))], shapes)
    ax.set_yscale("log")
    ax.set_ylabel("fwd+bwd ms (log scale)")
    ax.set_title(f"attention, block_causal documents, bf16, {data['meta']['card']}, torch {data['meta']['torch']}")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    plot_train(RESULTS / "bench_train_h100.json", IMG / "bench_train_h100.png")
    plot_attention(RESULTS / "bench_attention_h100.json", IMG / "bench_attention_h100.png")


if __name__ == "__main__":
    main()
