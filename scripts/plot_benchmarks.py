"""The benchmark plots of docs/ (docs/img/) from the JSON the benchmark scripts write (docs/results/):
the one-GPU training step, the attention kernels, FSDP2 scaling (every docs/results/bench_scaling_*.json,
one per GPU count) and the FSDP2 recipe runs.

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
TARGETS = {2: 1.9, 4: 3.6, 8: 7.0}  # scaling over 1 GPU


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


def plot_fsdp2_runs(h100_path: Path, h200_path: Path, out: Path) -> None:
    """FSDP2 throughput against the ideal n x one GPU, and the loss gaps against one GPU per step."""
    h100, h200 = json.loads(h100_path.read_text()), json.loads(h200_path.read_text())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for data, label, color, offset in (
        (h100, "H100 host", "#1f77b4", (6, -12)),
        (h200, "H200 host", "#ff7f0e", (-40, 6)),
    ):
        gpus = [1, data["gpus"], *(int(m) for m in data.get("more_gpus") or {})]
        tps = [
            data["tokens_per_s_one_gpu"],
            data["tokens_per_s_n_gpus"],
            *(m["tokens_per_s"] for m in (data.get("more_gpus") or {}).values()),
        ]
        ax1.plot(gpus, [t / 1e3 for t in tps], "o-", color=color, label=f"{label} (measured)")
        ax1.plot(gpus, [g * tps[0] / 1e3 for g in gpus], ":", color=color, label=f"{label} (n x one GPU)")
        for g, t in zip(gpus[1:], tps[1:], strict=True):
            ax1.annotate(f"{t / tps[0]:.2f}x", (g, t / 1e3), textcoords="offset points", xytext=offset)
    ax1.set_xticks([1, 2, 4])
    ax1.set_xlabel("GPUs (same global batch: 8 x 4096 tokens)")
    ax1.set_ylabel("thousand tokens/s")
    ax1.set_title("FSDP2 throughput")
    ax1.legend(fontsize=8)

    def gaps(a: list[float], b: list[float]) -> list[float]:
        return [abs(x - y) for x, y in zip(a, b, strict=True)]

    steps = range(1, len(h100["losses_one"]) + 1)
    ax2.plot(steps, gaps(h200["losses_one"], h200["losses_n"]), label="2 GPUs vs 1 (H200)")
    ax2.plot(steps, gaps(h100["losses_one"], h100["losses_n"]), label="2 GPUs vs 1 (H100)")
    for m, run in (h100.get("more_gpus") or {}).items():
        ax2.plot(steps, gaps(h100["losses_one"], run["losses"]), label=f"{m} GPUs vs 1 (H100)")
    ax2.plot(steps, gaps(h100["losses_one"], h200["losses_one"]), "k--", label="1 GPU: H100 run vs H200 run")
    ax2.set_xlabel("step")
    ax2.set_ylabel("|loss difference|")
    ax2.set_title("loss agreement (losses 12.2 -> 5.9)")
    ax2.legend(fontsize=8)
    fig.suptitle(
        f"Llama-3.2-1B shape, compiled blocks, flex, torch {h100['torch']}; each host's runs in one call",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def plot_scaling(paths: list[Path], out: Path) -> None:
    """What scripts/bench_scaling.py measured, one result file per GPU count, each with its own 1-GPU runs.
    Left: tokens/s of the 1-GPU runs and of the main N-GPU configuration (median, bars from the slowest to
    the fastest run) and of each variant (dots). Right: scaling (N-GPU median over the 1-GPU median of the
    same file), with the ideal line and the targets (1.9x on 2 GPUs, 3.6x on 4, 7.0x on 8)."""
    results = sorted((json.loads(p.read_text()) for p in paths), key=lambda r: r["gpus"])
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
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    plot_train(RESULTS / "bench_train_current_h100.json", IMG / "bench_train_current_h100.png")
    plot_attention(RESULTS / "bench_attention_h100.json", IMG / "bench_attention_h100.png")
    plot_scaling(sorted(RESULTS.glob("bench_scaling_*.json")), IMG / "scaling.png")
    plot_fsdp2_runs(
        RESULTS / "bench_distributed_4xh100.json",
        RESULTS / "bench_distributed_2xh200.json",
        IMG / "bench_distributed_scaling.png",
    )


if __name__ == "__main__":
    main()
