"""The benchmark plots of docs/ (docs/img/) from the JSON the benchmark scripts write (docs/results/):
the one-GPU training step, the attention kernels, FSDP2 scaling (every docs/results/bench_scaling_*.json,
one per GPU count), the FSDP2 recipe runs, and float8 against bf16 (throughput, loss curves: each run's
gap to bf16 seed A next to bf16 seed B's, the run-to-run noise; GPU time per step by kind of kernel).

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


COLORS = {"bf16": "#555555", "bf16-a": "#555555", "bf16-b": "#aaaaaa", "tensorwise": "#1f77b4", "rowwise": "#d62728"}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_float8_throughput(path: Path, out: Path) -> None:
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


def plot_float8_curves(path: Path, out_dir: Path, window: int = 10) -> None:
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


def plot_float8_profile(paths: list[Path], out: Path) -> None:
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
    IMG.mkdir(parents=True, exist_ok=True)
    plot_train(RESULTS / "bench_train_current_h100.json", IMG / "bench_train_current_h100.png")
    plot_attention(RESULTS / "bench_attention_h100.json", IMG / "bench_attention_h100.png")
    plot_scaling(sorted(RESULTS.glob("bench_scaling_*.json")), IMG / "scaling.png")
    plot_float8_throughput(RESULTS / "float8_throughput.json", IMG / "float8_throughput.png")
    plot_float8_curves(RESULTS / "float8_curves.json", IMG)  # float8_loss_<workload>.png
    plot_float8_profile(sorted(RESULTS.glob("float8_profile_*.json")), IMG / "float8_profile.png")
    plot_fsdp2_runs(
        RESULTS / "bench_distributed_4xh100.json",
        RESULTS / "bench_distributed_2xh200.json",
        IMG / "bench_distributed_scaling.png",
    )


if __name__ == "__main__":
    main()
