"""Draw docs/img/chat_labels.png: the labels of one real packed row of conversations.

The row (the first batch's least padded one) comes from the loader exactly as training sees it: the
default conversation set rendered with SmolLM2-135M-Instruct's chat template (ChatML), packed whole
into rows. Each cell is one position:
the input token on top, its label (the token to predict) below; green where the label is trained,
grey where it is -100. A black frame marks the document delimiter.

python scripts/plot_chat_labels.py [--tokenizer DIR] [--seq-len 112] [--out docs/img/chat_labels.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from nemo_lite.components.datasets import IGNORE_INDEX, DataConfig, build_dataloader  # noqa: E402
from nemo_lite.testing.smollm2 import default_smollm2_dir  # noqa: E402

COLUMNS = 14
TRAINED, IGNORED = "#8FD19E", "#E3E3E3"


def show(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    text = text.replace("\n", "\\n").replace(" ", "·")
    return text if len(text) <= 12 else text[:11] + "…"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", default=str(default_smollm2_dir()), help="a chat model's tokenizer directory")
    parser.add_argument("--seq-len", type=int, default=168)
    parser.add_argument("--out", default="docs/img/chat_labels.png")
    args = parser.parse_args()

    cfg = DataConfig(
        source="default_chat",
        messages_field="messages",
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        batch_size=8,
        validation_fraction=0.0,
        prefetch=0,
    )
    loader = build_dataloader(cfg)
    tokenizer, delimiter = loader.tokenizer, loader.eos_id
    batch = next(iter(loader))
    # The first batch's row with the least padding (the most conversation tokens) shows the most.
    row = max(range(len(batch["input_ids"])), key=lambda r: int((batch["input_ids"][r] != delimiter).sum()))
    input_ids = batch["input_ids"][row].tolist()
    labels = batch["labels"][row].tolist()

    lines = -(-len(input_ids) // COLUMNS)
    fig, ax = plt.subplots(figsize=(COLUMNS * 1.05, lines * 0.62 + 1.1))
    for i, (token, label) in enumerate(zip(input_ids, labels, strict=True)):
        x, y = i % COLUMNS, lines - 1 - i // COLUMNS
        trained = label != IGNORE_INDEX
        ax.add_patch(Rectangle((x + 0.03, y + 0.05), 0.94, 0.9, color=TRAINED if trained else IGNORED))
        if token == delimiter:
            ax.add_patch(Rectangle((x + 0.03, y + 0.05), 0.94, 0.9, fill=False, edgecolor="black", linewidth=2))
        ax.text(x + 0.5, y + 0.64, show(tokenizer, token), ha="center", va="center", fontsize=7, family="monospace")
        below = show(tokenizer, label) if trained else "-100"
        ax.text(x + 0.5, y + 0.27, f"→{below}", ha="center", va="center", fontsize=6, color="#333333")
    ax.set_xlim(0, COLUMNS)
    ax.set_ylim(0, lines)
    ax.axis("off")
    n_trained = sum(label != IGNORE_INDEX for label in labels)
    name = tokenizer.name_or_path.rstrip("/").split("/")[-1]
    ax.set_title(
        f"One packed row (seq_len={len(input_ids)}) of the default conversation set, {name}'s "
        f"chat template: {n_trained} of {len(labels)} labels trained. Top: input token; below: its label. "
        f"Black frame: the delimiter {tokenizer.convert_ids_to_tokens(delimiter)!r}",
        fontsize=9,
    )
    ax.legend(
        handles=[
            Patch(color=TRAINED, label="label trained (assistant text + <|im_end|>)"),
            Patch(color=IGNORED, label="label -100"),
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=2,
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
