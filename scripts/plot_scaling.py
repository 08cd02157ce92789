"""Plot what scripts/bench_scaling.py measured: tokens/s and scaling against one GPU.

    python scripts/plot_scaling.py docs/results/bench_scaling_2xh200.json [more.json ...] [--out docs/img/scaling.png]

One result file per GPU count (2, 4, 8, ...), each with its own 1-GPU runs. Left: tokens/s of the 1-GPU
runs and of the main N-GPU configuration (median, bars from the slowest to the fastest run) and of each
variant (dots). Right: scaling (N-GPU median over the 1-GPU median of the same file), with the ideal line
and the targets (1.9x on 2 GPUs, 3.6x on 4, 7.0x on 8).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGETS = {2: 1.9, 4: 3.6, 8: 7.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/img/scaling.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted((json.loads(p.read_text()) for p in args.results), key=lambda r: r["gpus"])
    fig, (ax_tps, ax_scale) = plt.subplots(1, 2, figsize=(11, 4.2))
    gpus_axis, scaling = [1], [1.0]
    for r in results:
        n, one, many = r["gpus"], r["one_gpu"], r["n_gpus"]
        for x, s, color in ((1, one, "tab:gray"), (n, many, "tab:blue")):
            if s is None:
                continue
            t = s["tokens_per_s"]
            err = [[(t["median"] - t["min"]) / 1e3], [(t["max"] - t["median"]) / 1e3]]
            ax_tps.errorbar([x], [t["median"] / 1e3], yerr=err, fmt="o", color=color, capsize=4)
        for name, v in (r.get("variants") or {}).items():
            if v["summary"] is not None:
                tps = v["summary"]["tokens_per_s"]["median"] / 1e3
                ax_tps.plot([n + 0.08], [tps], ".", color="tab:orange")
                ax_tps.annotate(name, (n + 0.12, tps), fontsize=6, va="center")
        if one and many:
            gpus_axis.append(n)
            scaling.append(many["scaling"]["median"])
            lo, hi = many["scaling"]["min"], many["scaling"]["max"]
            ax_scale.errorbar(
                [n], [scaling[-1]], yerr=[[scaling[-1] - lo], [hi - scaling[-1]]], fmt="o", color="tab:blue", capsize=4
            )
            ax_scale.annotate(f"{scaling[-1]:.2f}x", (n, scaling[-1]), textcoords="offset points", xytext=(8, -4))
    top = max(gpus_axis)
    ax_scale.plot([1, top], [1, top], "--", color="tab:gray", label="ideal")
    targets = [(n, t) for n, t in TARGETS.items() if n <= top]
    if targets:
        ax_scale.plot(*zip(*targets, strict=True), "x", color="tab:red", label="target")
    ax_scale.plot(gpus_axis, scaling, "-", color="tab:blue", alpha=0.5)
    ax_scale.set(xlabel="GPUs", ylabel="tokens/s over 1 GPU", title="scaling, same global batch")
    ax_scale.set_xticks(sorted(set(gpus_axis)))
    ax_scale.legend()
    ax_tps.set(xlabel="GPUs", ylabel="k tokens/s (median, min-max)", title="throughput")
    ax_tps.set_xticks(sorted({1, *(r["gpus"] for r in results)}))
    first = results[0]
    fig.suptitle(
        f"{first.get('card', '')}, {first['rows']} x {first['seq_len']} tokens per step, {first.get('date', '')}"
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
