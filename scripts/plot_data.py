"""Draw docs/img/data_packed_batch.png: a packed batch and the block-causal masks of its rows.

python scripts/plot_data.py [--out docs/img/data_packed_batch.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from nemo_lite.components.attention.masks import dense_mask, document_ids  # noqa: E402
from nemo_lite.components.datasets import collate_rows, pack_documents  # noqa: E402

EOS = 0
SEQ_LEN = 24
DOC_LENGTHS = [5, 11, 3, 20, 9, 14]  # + EOS each: 68 tokens -> 2 rows of 24 (+1)
PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def example_batch() -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    docs, token = [], 1
    for n in DOC_LENGTHS:
        docs.append(list(range(token, token + n)))
        token += n
    rows = list(pack_documents(docs, seq_len=SEQ_LEN, eos_id=EOS))[:2]
    # the document index of every token of the stream, for colors that follow a document across rows
    stream_doc = [i for i, d in enumerate(docs) for _ in range(len(d) + 1)]
    row_docs = [stream_doc[r * SEQ_LEN : r * SEQ_LEN + SEQ_LEN] for r in range(len(rows))]
    return collate_rows(rows, eos_id=EOS, mask_cross_document_labels=True), row_docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/img/data_packed_batch.png")
    args = parser.parse_args()

    batch, row_docs = example_batch()
    input_ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    B, S = input_ids.shape
    cmap = ListedColormap(PALETTE[: len(DOC_LENGTHS)])

    fig = plt.figure(figsize=(13, 8.2))
    grid = fig.add_gridspec(2, 2, height_ratios=[1.05, 2.2], hspace=0.32, wspace=0.12)
    ax = fig.add_subplot(grid[0, :])
    ax.set_title(
        f"A packed batch: B={B} rows of S={S} tokens (each row cut from the stream as S+1 tokens); "
        "colour = document, black frame = EOS",
        fontsize=10,
    )
    lines = []  # (y, row, kind)
    for r in range(B):
        lines += [(r, "input_ids"), (r, "position_ids"), (r, "labels")]
    for y, (r, kind) in enumerate(lines):
        for s in range(S):
            doc = row_docs[r][s]
            tok = int(input_ids[r, s])
            if kind == "input_ids":
                face, text = PALETTE[doc], "E" if tok == EOS else str(tok)
            elif kind == "position_ids":
                face, text = PALETTE[doc] + "66", str(int(positions[r, s]))
            else:
                lab = int(labels[r, s])
                nxt = row_docs[r][s + 1] if s + 1 < S else doc if tok != EOS else doc + 1
                face = "#FFFFFF" if lab == -100 else PALETTE[nxt] + "66"
                text = "-100" if lab == -100 else ("E" if lab == EOS else str(lab))
            ax.add_patch(Rectangle((s, -y - 1), 1, 1, facecolor=face, edgecolor="white", lw=0.8))
            if kind == "input_ids" and tok == EOS:
                ax.add_patch(Rectangle((s + 0.05, -y - 0.95), 0.9, 0.9, fill=False, edgecolor="black", lw=2))
            ax.text(s + 0.5, -y - 0.5, text, ha="center", va="center", fontsize=6.5 if len(text) > 2 else 7.5)
        ax.text(-0.3, -y - 0.5, f"row {r}  {kind}", ha="right", va="center", fontsize=8)
        if kind == "labels" and r < B - 1:
            ax.axhline(-y - 1.15, color="#999999", lw=0.6, xmin=0.0, xmax=1.0)
    ax.set_xlim(-7.5, S + 0.2)
    ax.set_ylim(-len(lines) - 0.2, 0.1)
    ax.axis("off")
    ax.text(
        S / 2,
        -len(lines) - 0.1,
        "labels = inputs shifted by one; with mask_cross_document_labels=True (shown) the label after an EOS\n"
        "is -100 (kept when False). position_ids restart after every EOS and carry on across rows.",
        ha="center",
        va="top",
        fontsize=8,
    )

    doc_ids_BS = document_ids(input_ids, EOS)
    allowed_BSS = dense_mask(S, doc_ids_BS=doc_ids_BS)[:, 0]
    for r in range(B):
        ax = fig.add_subplot(grid[1, r])
        img = torch.where(allowed_BSS[r], torch.tensor(row_docs[r])[:, None].expand(S, S), -1).float()
        shown = img.masked_fill(img < 0, float("nan"))
        ax.imshow(shown, cmap=cmap, vmin=-0.5, vmax=len(DOC_LENGTHS) - 0.5, interpolation="nearest")
        ax.set_facecolor("#F4F4F4")
        eos_at = (input_ids[r] == EOS).nonzero().flatten().tolist()
        for e in eos_at:
            ax.axhline(e + 0.5, color="black", lw=0.6, ls=":")
            ax.axvline(e + 0.5, color="black", lw=0.6, ls=":")
        ax.set_title(f"row {r}: block-causal mask (query q down, key k across; coloured = attend)", fontsize=9)
        ax.set_xticks(range(0, S, 4))
        ax.set_yticks(range(0, S, 4))
        ax.tick_params(labelsize=7)
        ax.set_xlabel("k  (dotted lines: after each EOS)", fontsize=8)
        if r == 0:
            ax.set_ylabel("q", fontsize=8)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
