"""Draw the mask rules: each rule on one packed row (docs/img/attention_masks.png), and the shared_prompt rule
beside the two separate sequences it stands for (docs/img/attention_shared_prompt.png).

python scripts/plot_masks.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nemo_lite.components.attention import dense_mask, document_ids  # noqa: E402
from nemo_lite.components.attention.masks import branches_of  # noqa: E402

EOS = 0
ROW = torch.tensor([[5, 5, 5, 5, 0, 7, 7, 0, 0, 9, 9, 9, 9, 9, 9, 0, 3, 3, 3, 3]])
# One preference pair: prompt P (5 tokens), chosen C (4), then the prompt's last token again (p) and rejected R (3).
PROMPT, CHOSEN, REJECTED = 5, 4, 3
SHARED_IDS = [1] * PROMPT + [2] * CHOSEN + [1] + [3] * REJECTED + [EOS]
SHARED_POS = [*range(PROMPT + CHOSEN), *range(PROMPT - 1, PROMPT + REJECTED + 1)]
SEPARATE_IDS = [1] * PROMPT + [2] * CHOSEN + [EOS] + [1] * PROMPT + [3] * REJECTED + [EOS]
SHARED_LABELS = ["P"] * PROMPT + ["C"] * CHOSEN + ["p"] + ["R"] * REJECTED + ["E"]
SEPARATE_LABELS = ["P"] * PROMPT + ["C"] * CHOSEN + ["E"] + ["P"] * PROMPT + ["R"] * REJECTED + ["E"]


def draw(panels: dict[str, tuple[torch.Tensor, list[str]]], title: str, out: Path, *, xlabel: str, ylabel: str,
         size: tuple[float, float], rotate: int = 0) -> None:  # fmt: skip
    """One panel per mask (``title -> (mask, tick labels)``), blue where a query may attend, saved to ``out``."""
    fig, axes = plt.subplots(1, len(panels), figsize=size)
    for ax, (name, (mask, ticks)) in zip(axes, panels.items(), strict=True):
        ax.imshow(mask[0, 0].numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(name, fontsize=10)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=6, rotation=rotate)
        ax.set_yticks(range(len(ticks)), ticks, fontsize=6)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def rules(out: Path) -> None:
    docs = document_ids(ROW, EOS)
    seq_len = ROW.shape[1]
    labels = ["E" if t == EOS else str(int(d)) for t, d in zip(ROW[0].tolist(), docs[0].tolist(), strict=True)]
    masks = {
        "causal": dense_mask(seq_len),
        "block_causal": dense_mask(seq_len, doc_ids_BS=docs),
        "block_causal + fixed_block_size=6": dense_mask(seq_len, doc_ids_BS=docs, fixed_block_size=6),
        "block_causal + sliding_window=3": dense_mask(seq_len, doc_ids_BS=docs, sliding_window=3),
    }
    title = "One packed row of 20 tokens, 4 documents; blue = may attend"
    panels = {name: (mask, labels) for name, mask in masks.items()}
    draw(panels, title, out, xlabel="key (document id, E = EOS)", ylabel="query", size=(4 * len(panels), 4.8))


def shared_prompt(out: Path) -> None:
    separate, shared = torch.tensor([SEPARATE_IDS]), torch.tensor([SHARED_IDS])
    shared_docs = document_ids(shared, EOS)
    branches = branches_of(shared_docs, torch.tensor([SHARED_POS]))
    panels = {
        f"separate: prompt+chosen, prompt+rejected ({len(SEPARATE_IDS)} tokens)": (
            dense_mask(len(SEPARATE_IDS), doc_ids_BS=document_ids(separate, EOS)),
            SEPARATE_LABELS,
        ),
        f"shared_prompt: prompt, chosen, p+rejected ({len(SHARED_IDS)} tokens)": (
            dense_mask(len(SHARED_IDS), doc_ids_BS=shared_docs, branches=branches),
            [f"{label}{p}" for label, p in zip(SHARED_LABELS, SHARED_POS, strict=True)],
        ),
    }
    title = (
        "One preference pair; blue = may attend. P prompt, C chosen, R rejected, p the prompt's last token again, "
        "E delimiter.\nWith shared_prompt the rejected answer sees the prompt, not the chosen one, at the positions "
        "of its own sequence"
    )
    ylabel = "query (right: token and position id)"
    draw(panels, title, out, xlabel="key", ylabel=ylabel, size=(11, 5.6), rotate=90)


def main(img: Path = Path("docs/img")) -> None:
    rules(img / "attention_masks.png")
    shared_prompt(img / "attention_shared_prompt.png")


if __name__ == "__main__":
    main()
