"""Draw one MoE layer's dispatch, from a real routing of a few tokens: docs/img/moe_dispatch.png.

python scripts/plot_moe_dispatch.py

Left: each token's top-2 experts (the router's choice, in token order). Middle: the (token, expert) pairs
sorted by expert, the runs that the offsets delimit, one grouped GEMM over all runs. Right: the rows back in
token order, each token's two rows summed with the router's weights.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nemo_lite.components.models.moe import Router  # noqa: E402

TOKENS, EXPERTS, TOP_K = 8, 4, 2


def main(out: Path = Path("docs/img/moe_dispatch.png")) -> None:
    torch.manual_seed(3)
    router = Router(16, EXPERTS, TOP_K, norm_topk_prob=True)
    torch.nn.init.normal_(router.weight, std=0.3)
    _, weights_TK, experts_TK = router(torch.randn(TOKENS, 16))
    expert_N = experts_TK.reshape(-1)
    order_N = torch.argsort(expert_N, stable=True)
    offsets = torch.bincount(expert_N, minlength=EXPERTS).cumsum(0).tolist()
    colors = plt.get_cmap("tab10")(range(EXPERTS))

    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(-0.5, 10.8)
    ax.set_ylim(-1.6, 2 * TOKENS + 0.6)
    ax.axis("off")
    rows = TOKENS * TOP_K

    def y_of(i: int, n: int) -> float:  # rows drawn top to bottom
        return (n - 1 - i) * (2 * TOKENS) / (n - 1)

    # tokens and their choices
    for t in range(TOKENS):
        y = y_of(t, TOKENS)
        ax.add_patch(plt.Rectangle((0, y - 0.45), 0.9, 0.9, color="0.85"))
        ax.text(0.45, y, f"t{t}", ha="center", va="center", fontsize=9)
        for k in range(TOP_K):
            e = int(experts_TK[t, k])
            ax.add_patch(plt.Rectangle((1.1 + 0.55 * k, y - 0.4), 0.5, 0.8, color=colors[e]))
            ax.text(1.35 + 0.55 * k, y, f"E{e}\n{weights_TK[t, k]:.2f}", ha="center", va="center", fontsize=6.5)
    ax.text(1.1, 2 * TOKENS + 0.5, "router: top-2 experts\nand weights per token", fontsize=9, va="bottom")

    # sorted pairs, runs by expert, the grouped GEMM
    x0 = 3.6
    for i, n in enumerate(order_N.tolist()):
        t, e = n // TOP_K, int(expert_N[n])
        y = y_of(i, rows)
        ax.add_patch(plt.Rectangle((x0, y - 0.4), 1.2, 0.8, color=colors[e], alpha=0.85))
        ax.text(x0 + 0.6, y, f"t{t}", ha="center", va="center", fontsize=7)
        ax.plot([1.1 + 0.55 * (n % TOP_K) + 0.5, x0], [y_of(t, TOKENS), y], color=colors[e], lw=0.6, alpha=0.6)
    start = 0
    for e, end in enumerate(offsets):
        if end > start:
            top, bottom = y_of(start, rows) + 0.45, y_of(end - 1, rows) - 0.45
            ax.add_patch(plt.Rectangle((x0 + 1.5, bottom), 1.5, top - bottom, color=colors[e], alpha=0.35))
            label = f"x @ W{e}\n{end - start} rows"
            ax.text(x0 + 2.25, (top + bottom) / 2, label, ha="center", va="center", fontsize=8)
        ax.text(x0 - 0.1, y_of(end - 1, rows) - 0.75, f"offs[{e}]={end}", ha="right", va="center", fontsize=6.5)
        start = end
    ax.text(x0, 2 * TOKENS + 0.5, "pairs sorted by expert;\none grouped GEMM per projection", fontsize=9, va="bottom")

    # back to token order, combined
    x1 = 8.4
    for t in range(TOKENS):
        y = y_of(t, TOKENS)
        ax.add_patch(plt.Rectangle((x1, y - 0.45), 1.6, 0.9, color="0.85"))
        parts = " + ".join(f"{weights_TK[t, k]:.2f}·E{int(experts_TK[t, k])}" for k in range(TOP_K))
        ax.text(x1 + 0.8, y, parts, ha="center", va="center", fontsize=6.5)
        for k in range(TOP_K):
            i = int((order_N == t * TOP_K + k).nonzero())
            ax.plot([x0 + 3.0, x1], [y_of(i, rows), y], color=colors[int(experts_TK[t, k])], lw=0.6, alpha=0.6)
    ax.text(x1, 2 * TOKENS + 0.5, "back to token order,\nsummed with the weights", fontsize=9, va="bottom")
    note = f"{TOKENS} tokens, {EXPERTS} experts, top-{TOP_K}: no token dropped, no capacity limit"
    ax.text(0, -1.4, note, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
