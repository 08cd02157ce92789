"""Draw where each part of nemo_lite lives and how one batch and its mask reach the attention kernel:
docs/img/architecture.png (shown in docs/architecture.md).

python scripts/plot_architecture.py

Boxes are placed in inches on a fixed canvas. The script refuses to save a picture in which a text
leaves its box or covers another text or box, so an edit that crowds the picture fails loudly.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

WIDTH, HEIGHT = 16.0, 11.0  # inches; 1 data unit = 1 inch
TITLE_PT, BODY_PT, LABEL_PT, ARROW_PT = 10.5, 9.5, 11.5, 9.0

PACKAGES = {  # package -> (edge colour, fill of its frame)
    "components/datasets": ("#2e7d32", "#eef7ee"),
    "components/attention": ("#d84315", "#fff3ea"),
    "components/models": ("#1565c0", "#edf3fc"),
    "training": ("#6a1b9a", "#f5eefa"),
    "training/fast": ("#ad1457", "#fdebf3"),
    "recipes/ + configs/": ("#455a64", "#f0f3f4"),
}
INK = "#263238"


class Diagram:
    def __init__(self) -> None:
        self.fig = plt.figure(figsize=(WIDTH, HEIGHT))
        self.ax = self.fig.add_axes((0, 0, 1, 1))
        self.ax.set_xlim(0, WIDTH)
        self.ax.set_ylim(0, HEIGHT)
        self.ax.axis("off")
        self.inside: list[tuple[plt.Text, FancyBboxPatch]] = []  # each text must stay in its patch
        self.boxes: list[FancyBboxPatch] = []  # no text may cover a box other than its own

    def frame(self, x, y, w, h, package, label=None, note=None) -> None:
        """A package's frame with its name at the top left (and a note at the top right)."""
        edge, fill = PACKAGES[package]
        patch = FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0,rounding_size=0.12", fc=fill, ec=edge, lw=1.6, zorder=0
        )
        self.ax.add_patch(patch)
        top = y + h - 0.1
        name = self.ax.text(
            x + 0.18, top, label or package, ha="left", va="top", fontsize=LABEL_PT, weight="bold", color=edge
        )
        self.inside.append((name, patch))
        if note:
            text = self.ax.text(
                x + w - 0.18, top, note, ha="right", va="top", fontsize=BODY_PT, style="italic", color=edge
            )
            self.inside.append((text, patch))

    def box(self, rect, package, title, *lines, weight=1.4) -> tuple[float, float, float, float]:
        """A white box at ``rect`` (x, y, w, h) with a bold title over ``lines``; its edge has the colour of
        the package that owns it."""
        x, y, w, h = rect
        edge, _ = PACKAGES[package]
        patch = FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0,rounding_size=0.08", fc="white", ec=edge, lw=weight, zorder=2
        )
        self.ax.add_patch(patch)
        self.boxes.append(patch)
        top = y + h - 0.09
        title_text = self.ax.text(
            x + w / 2, top, title, ha="center", va="top", fontsize=TITLE_PT, weight="bold", color=edge, zorder=3
        )
        self.inside.append((title_text, patch))
        if lines:
            body_text = self.ax.text(
                x + w / 2,
                top - TITLE_PT * 1.45 / 72,
                "\n".join(lines),
                ha="center",
                va="top",
                fontsize=BODY_PT,
                color=INK,
                linespacing=1.25,
                zorder=3,
            )
            self.inside.append((body_text, patch))
        return x, y, w, h

    def arrow(self, points, color=INK, lw=1.6, label=None, label_xy=None) -> None:
        """An arrow along ``points`` (straight segments, the head on the last one), with an optional label."""
        *lead, start, end = points
        if lead:
            xs, ys = zip(*lead, start, strict=True)
            self.ax.plot(xs, ys, color=color, lw=lw, solid_capstyle="butt", zorder=1)
        head = FancyArrowPatch(
            start, end, arrowstyle="-|>", mutation_scale=14, color=color, lw=lw, shrinkA=0, shrinkB=0
        )
        head.set_zorder(4)
        self.ax.add_patch(head)
        if label:
            self.ax.text(
                *label_xy,
                label,
                ha="center",
                va="center",
                fontsize=ARROW_PT,
                color=color,
                style="italic",
                zorder=5,
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"},
            )

    def check(self) -> None:
        """Raise if a text leaves its box, or covers another text or a box that is not its own."""
        self.fig.canvas.draw()
        renderer = self.fig.canvas.get_renderer()
        extent = {t: t.get_window_extent(renderer) for t in self.ax.texts}
        own = dict(self.inside)
        problems = []
        for text, patch in self.inside:
            inner, outer = extent[text], patch.get_window_extent(renderer)
            if not (outer.x0 <= inner.x0 and inner.x1 <= outer.x1 and outer.y0 <= inner.y0 and inner.y1 <= outer.y1):
                problems.append(f"{text.get_text()[:40]!r} leaves its box")
        for a, b in itertools.combinations(self.ax.texts, 2):
            if extent[a].overlaps(extent[b]):
                problems.append(f"{a.get_text()[:40]!r} overlaps {b.get_text()[:40]!r}")
        for text in self.ax.texts:
            for patch in self.boxes:
                if patch is not own.get(text) and extent[text].overlaps(patch.get_window_extent(renderer)):
                    problems.append(f"{text.get_text()[:40]!r} covers another box")
        if problems:
            raise SystemExit("the picture is crowded:\n  " + "\n  ".join(problems))


def right(b, dy=None):
    x, y, w, h = b
    return x + w, y + h / 2 if dy is None else y + dy


def left(b, dy=None):
    x, y, w, h = b
    return x, y + h / 2 if dy is None else y + dy


def top(b, dx=None):
    x, y, w, h = b
    return x + w / 2 if dx is None else x + dx, y + h


def bottom(b, dx=None):
    x, y, w, h = b
    return x + w / 2 if dx is None else x + dx, y


def draw() -> Diagram:
    d = Diagram()
    data, recipes = "components/datasets", "recipes/ + configs/"
    trn, att, mdl, fast = "training", "components/attention", "components/models", "training/fast"
    d.ax.text(
        WIDTH / 2,
        HEIGHT - 0.22,
        "nemo_lite: where each part lives, and how one batch and its mask go from the loader to the attention kernel",
        ha="center",
        va="top",
        fontsize=13,
        weight="bold",
        color=INK,
    )

    # ---- row 1: the data pipeline, and the recipes that start a run ------------------------------
    d.frame(0.15, 8.7, 10.6, 1.65, data, note="config.py: DataConfig, the schema of the YAML data: group")
    w, y, h = 2.3, 8.83, 1.17
    source = d.box(
        (0.35, y, w, h),
        data,
        "source",
        "sources.py: HF datasets,",
        "hub name or local files;",
        '"default": built-in corpus',
    )
    tokenizer = d.box((3.0, y, w, h), data, "tokenizer", "tokenizer.py:", "build_tokenizer;", "document → ids + EOS")
    packer = d.box(
        (5.65, y, w, h),
        data,
        "DocumentPacker",
        "packing.py: rows of seq_len+1,",
        "EOS-delimited; position_ids",
        "restart per document",
    )
    loader = d.box(
        (8.3, y, w, h),
        data,
        "PackedDataLoader",
        "loader.py: background thread,",
        "sharded by rank, state_dict",
        "for an exact resume",
    )
    for a, b in itertools.pairwise([source, tokenizer, packer, loader]):
        d.arrow([right(a), left(b)], color=PACKAGES[data][0])

    d.frame(11.0, 8.7, 4.85, 1.65, recipes)
    d.box(
        (11.2, y, 4.45, h),
        recipes,
        "recipes/pretrain.py · finetune.py",
        "configs/: Hydra groups model/ attention/ data/",
        "optim/ logger/ (attention=sdpa swaps the backend)",
        "→ training/launch.py → Trainer(cfg).fit()",
    )

    # ---- row 2: the trainer: one step, and its set-up ----------------------------------------------
    d.frame(0.15, 4.9, 15.7, 3.25, trn, label="training/trainer.py · Trainer")
    d.ax.text(
        15.67,
        8.05,
        "steps 1–5 for each micro-batch, 6 once per step · a box's edge: the package that runs it",
        ha="right",
        va="top",
        fontsize=BODY_PT,
        style="italic",
        color=PACKAGES[trn][0],
    )
    steps = [
        (trn, "1  to device", "batch.to(device,", "non_blocking=True):", "input_ids, labels,", "position_ids [B, S]"),
        (
            att,
            "2  build the mask",
            "model.build_attention_mask",
            "→ backend.build_mask",
            "(input_ids, eos_id): once,",
            "on the device",
        ),
        (
            mdl,
            "3  forward",
            "step_impl.loss →",
            "model.forward_hidden(ids,",
            "position_ids, mask); every",
            "layer reads the same mask",
        ),
        (
            trn,
            "4  head loss",
            "step_impl.loss: summed",
            "cross-entropy against",
            "model.output_weight,",
            "under autocast",
        ),
        (
            trn,
            "5  backward",
            "(loss × scale).backward():",
            "the gradients add up",
            "over the micro-batches",
        ),
        (
            trn,
            "6  step_impl.apply",
            "step_impl.grad_norm; one",
            "all_reduce (torchrun); clip",
            "+ update + the one host",
            "sync; scheduler, metrics",
        ),
    ]
    w, gap = 2.3, 0.3
    boxes = [d.box((0.35 + i * (w + gap), 6.4, w, 1.3), *step, weight=2.2) for i, step in enumerate(steps)]
    for i, (a, b) in enumerate(itertools.pairwise(boxes)):
        mask = i == 1  # the mask goes from step 2 into the forward
        d.arrow([right(a), left(b)], color=PACKAGES[att][0] if mask else INK, lw=2.4 if mask else 1.6)
    # the loader's batches wrap around to step 1
    d.arrow(
        [bottom(loader), (bottom(loader)[0], 8.43), (top(boxes[0])[0], 8.43), top(boxes[0])],
        color=PACKAGES[data][0],
        lw=2.0,
        label="CPU tensors [B, S]: input_ids, labels, position_ids",
        label_xy=(5.1, 8.43),
    )
    d.box(
        (0.35, 5.03, 11.3, 0.97),
        trn,
        "Trainer.setup()",
        "data: build_dataloader · model through its family entry: build or load_pretrained, checkpointing over blocks,",
        "compile_units, shard (FSDP2 under torchrun), flops_per_token for MFU · step_impl = build_step(...) · resume",
    )
    d.box(
        (11.85, 5.03, 3.8, 0.97),
        trn,
        "Trainer.fit()",
        "the loop; checkpoints (DCP shards under",
        "torchrun); metrics, HF export, sample",
    )

    # ---- row 3: what the step calls, package by package --------------------------------------------
    d.frame(0.15, 0.15, 4.75, 4.55, att)
    build = d.box(
        (0.35, 2.65, 4.0, 1.65),
        att,
        "backend.build_mask(input_ids, eos_id)",
        "the step's mask, built once on the device:",
        "flex → BlockMask (compiled create_block_mask)",
        "sdpa, eager → a bool mask or is_causal",
        "varlen → cu_seqlens",
        "the trainer hands it to the model",
    )
    kernel = d.box(
        (0.35, 1.4, 4.0, 1.05),
        att,
        "backend(q, k, v, attention_mask=mask)",
        "one object, shared by every layer → kernel:",
        "flex_attention · SDPA · FlashAttention",
        "varlen · eager math",
    )
    d.box(
        (0.35, 0.3, 4.0, 0.9),
        att,
        "registry.py · masks.py",
        '@register_attention_backend("name"),',
        "one file per backend; masks.py: the rules",
    )

    d.frame(5.1, 0.15, 4.85, 4.55, mdl)
    family = d.box(
        (5.3, 3.25, 4.25, 1.05),
        mdl,
        "family.py · ModelFamily entry",
        "class, presets, HF types + load_pretrained, blocks,",
        "compile_units, shard (FSDP2 plan), FLOPs;",
        "family_of_preset · family_of_checkpoint",
    )
    llama = d.box(
        (5.3, 1.4, 4.25, 1.65),
        mdl,
        "llama.py · LlamaForCausalLM",
        "forward_hidden: nn.Embedding → rotary (once)",
        "→ N × DecoderBlock: RMSNorm, Attention, MLP",
        "→ RMSNorm → hidden [B, S, E]; each Attention",
        "calls the shared backend with the step's mask",
        "plain nn.Linear, nn.Embedding: no speed parts",
    )
    d.box(
        (5.3, 0.3, 4.25, 0.9),
        mdl,
        "config.py · hf.py · llama_family.py",
        "LlamaConfig, LLAMA_PRESETS · HF key map,",
        "safetensors · the Llama family entry",
    )

    d.frame(10.15, 0.15, 5.7, 4.55, trn)
    step = d.box(
        (10.35, 3.4, 5.3, 0.9),
        trn,
        "step.py · the step strategy",
        "TrainStep: loss, grad_norm, apply · build_step:",
        "trainer.step_impl = auto | fast | plain",
    )
    d.frame(10.3, 0.25, 3.45, 2.95, fast)
    fast_step = d.box((10.45, 2.15, 3.15, 0.75), fast, "FastStep · step.py", "the same arithmetic, fused")
    converters = d.box(
        (10.45, 1.2, 3.15, 0.75),
        fast,
        "converters.py",
        "CopyLinear: bf16 weight copies",
        "RowsEmbedding: gradient as rows",
    )
    d.box((10.45, 0.35, 3.15, 0.68), fast, "optim.py · *_kernel.py", "FusedAdamW: clip + skip in the kernel")
    plain = d.box((13.9, 2.15, 1.75, 1.0), trn, "PlainStep", "torch AdamW,", "clip_grad_norm_,", "torch loss")
    d.box(
        (13.9, 0.3, 1.75, 1.65),
        trn,
        "also in training/",
        "config.py · schedule.py",
        "checkpoint.py · loss.py",
        "distributed.py",
        "metrics.py",
        "profiling.py",
        "launch.py",
    )

    # the mask into the model, and every layer into the backend
    red, blue, purple, pink = (PACKAGES[p][0] for p in (att, mdl, trn, fast))
    d.arrow([right(build, 0.2), left(llama, 1.45)], color=red, lw=2.4, label="mask", label_xy=(4.85, 3.05))
    d.arrow([left(llama, 0.35), right(kernel, 0.35)], color=blue, lw=2.4, label="q, k, v", label_xy=(4.85, 1.95))
    # the seams: the family entry and the step strategy feed setup(); the fast step converts the model
    d.arrow([top(family, 2.2), (7.5, 5.03)], color=blue, lw=2.0, label="build · shard · FLOPs", label_xy=(7.5, 4.8))
    d.arrow([top(step, 0.95), (11.3, 5.03)], color=purple, lw=2.0, label="step_impl", label_xy=(11.3, 4.8))
    d.arrow([bottom(step, 1.6), top(fast_step, 1.5)], color=purple)
    d.arrow([bottom(step, 4.425), top(plain)], color=purple)
    d.arrow([bottom(fast_step), top(converters)], color=pink)
    d.arrow([left(converters), right(llama, 0.175)], color=pink, lw=2.0, label="module\nswaps", label_xy=(10.0, 1.95))
    return d


def main(out: Path = Path("docs/img/architecture.png")) -> None:
    d = draw()
    d.check()
    out.parent.mkdir(parents=True, exist_ok=True)
    d.fig.savefig(out, dpi=130, facecolor="white")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
