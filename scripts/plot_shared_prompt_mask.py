"""Draw the shared_prompt mask rule beside the two separate sequences it stands for:
docs/img/attention_shared_prompt.png.

python scripts/plot_shared_prompt_mask.py
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
# One pair: prompt P (5 tokens), chosen C (4), then the prompt's last token again (p) and rejected R (3).
PROMPT, CHOSEN, REJECTED = 5, 4, 3
SHARED_IDS = [1] * PROMPT + [2] * CHOSEN + [1] + [3] * REJECTED + [EOS]
SHARED_POS = [*range(PROMPT + CHOSEN), *range(PROMPT - 1, PROMPT + REJECTED + 1)]
SEPARATE_IDS = [1] * PROMPT + [2] * CHOSEN + [EOS] + [1] * PROMPT + [3] * REJECTED + [EOS]
SHARED_LABELS = ["P"] * PROMPT + ["C"] * CHOSEN + ["p"] + ["R"] * REJECTED + ["E"]
SEPARATE_LABELS = ["P"] * PROMPT + ["C"] * CHOSEN + ["E"] + ["P"] * PROMPT + ["R"] * REJECTED + ["E"]


def main(out: Path = Path("docs/img/attention_shared_prompt.png")) -> None:
    separate = torch.tensor([SEPARATE_IDS])
    shared, positions = torch.tensor([SHARED_IDS]), torch.tensor([SHARED_POS])
    shared_docs = document_ids(shared, EOS)
    panels = {
        f"separate: prompt+chosen, prompt+rejected ({len(SEPARATE_IDS)} tokens)": (
            dense_mask(len(SEPARATE_IDS), doc_ids_BS=document_ids(separate, EOS)),
            SEPARATE_LABELS,
            None,
        ),
        f"shared_prompt: prompt, chosen, p+rejected ({len(SHARED_IDS)} tokens)": (
            dense_mask(len(SHARED_IDS), doc_ids_BS=shared_docs, branches=branches_of(shared_docs, positions)),
            SHARED_LABELS,
            SHARED_POS,
        ),
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6))
    for ax, (title, (mask, labels, pos)) in zip(axes, panels.items(), strict=True):
        n = len(labels)
        ax.imshow(mask[0, 0].numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=10)
        ticks = labels if pos is None else [f"{lab}{p}" for lab, p in zip(labels, pos, strict=True)]
        ax.set_xticks(range(n), ticks, fontsize=6, rotation=90)
        ax.set_yticks(range(n), ticks, fontsize=6)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query" + ("" if pos is None else " (token and position id)"), fontsize=8)
    fig.suptitle(
        "One preference pair; blue = may attend. P prompt, C chosen, R rejected, p the prompt's last token again, "
        "E delimiter.\nWith shared_prompt the rejected answer sees the prompt, not the chosen one, at the positions "
        "of its own sequence",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
