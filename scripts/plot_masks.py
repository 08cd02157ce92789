"""Draw each mask rule on one packed row: docs/img/attention_masks.png.

python scripts/plot_masks.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from nemo_lite.components.attention import dense_mask, document_ids  # noqa: E402

EOS = 0
ROW = torch.tensor([[5, 5, 5, 5, 0, 7, 7, 0, 0, 9, 9, 9, 9, 9, 9, 0, 3, 3, 3, 3]])


def main(out: Path = Path("docs/img/attention_masks.png")) -> None:
    docs = document_ids(ROW, EOS)
    seq_len = ROW.shape[1]
    panels = {
        "causal": dense_mask(seq_len),
        "block_causal": dense_mask(seq_len, doc_ids_BS=docs),
        "block_causal + fixed_block_size=6": dense_mask(seq_len, doc_ids_BS=docs, fixed_block_size=6),
        "block_causal + sliding_window=3": dense_mask(seq_len, doc_ids_BS=docs, sliding_window=3),
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.8))
    labels = ["E" if t == EOS else str(int(d)) for t, d in zip(ROW[0].tolist(), docs[0].tolist(), strict=True)]
    for ax, (title, mask) in zip(axes, panels.items(), strict=True):
        ax.imshow(mask[0, 0].numpy(), cmap="Blues", vmin=0, vmax=1.3)
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(seq_len), labels, fontsize=6)
        ax.set_yticks(range(seq_len), labels, fontsize=6)
        ax.set_xlabel("key (document id, E = EOS)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.suptitle("One packed row of 20 tokens, 4 documents; blue = may attend", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
