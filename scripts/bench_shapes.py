"""Bigger shapes on one GPU: the Llama-3.2-3B and Llama-3.1-8B presets at 4k and 32k tokens a step, with
activation checkpointing none / full / selective and with and without the chunked loss.

    python scripts/bench_shapes.py [--presets llama-3.2-3b,llama-3.1-8b] [--tokens 4096,32768]
        [--ac none,selective,full] [--chunk 0,2048] [--steps 12] [--budget-s 540] [--out shapes.json]

Every row is nemo_lite's benchmark run (scripts/bench_utils.py: flex attention, compiled blocks, the fast
step, bf16 autocast over float32 master weights, random init) on EOS-delimited random documents
(log-normal lengths, mean ~600 tokens, a new layout every step; the preset's vocabulary).

Flags:
  --presets   model presets, comma-separated (any name ``get_preset`` knows; ``tiny`` runs on a CPU in seconds).
  --tokens    tokens per step, comma-separated: ``N`` is one row of N tokens (1 x N), ``BxS`` is B rows of S.
  --ac        trainer.activation_checkpointing modes to run: none, full, selective.
  --chunk     trainer.loss_chunk_size values to run: 0 is the unchunked loss (the fast step's Triton head loss),
              N > 0 is N tokens per chunk of the head + cross-entropy, recomputed in backward.
  --steps     steps per row; the medians leave out the first WARMUP (compilation, allocator warm-up).
  --budget-s  seconds since the script started after which no new row starts; a row is also not started
              where an earlier row of the same preset and tokens took longer than the time left. Rows not
              started are recorded as such.
  --out       the JSON written after every row (a time-out keeps what finished): meta, steps, rows.
  --run-dir   where the rows' run directories go (each is removed after its row; no checkpoint is written).
  --no-compile  eager blocks (for a CPU toy run; the GPU figures are compiled).

Per row: median tokens/s and step ms after warm-up, MFU (nemo_lite's definition: 6 x params x tokens + the
attention FLOPs of the actual document mask, against the card's bf16 dense peak), peak GPU memory (the most
allocated in set-up or any step), first and last loss, and the memory floor of the run's own check before
anything is built (training state at 16 bytes a parameter, the step's batches, each block's input kept as
activation); the floors and the free memory are printed for every row before the first one runs. A row
whose floor exceeds the free memory is refused by the run in one line before it allocates anything, and
that line is its row (``refused``); a row that runs out of memory on the way records torch's message
(``error``); neither stops the others.

Order: one call of under 10 minutes should give the most useful rows first, so rows go by preset (as given),
then by tier, then by tokens (as given), then by mode. Tier 1 of a preset and tokens is the loss setting
that run would use: the unchunked loss at up to 8192 tokens (where the logits are small and the Triton head
loss is fastest), the chunked loss above (where 32k tokens' float32 logits alone take 16 GB); its modes go
none, selective, full at up to 8192 tokens (fastest first) and selective, full, none above (most likely to
fit first). Tier 2 is the other loss setting, the chunking A/B. With the defaults:
3B 4k none/selective/full, 3B 32k chunked selective/full/none, 3B 4k chunked, 3B 32k unchunked, then 8B the
same way. The 8B's training state (16 bytes x 8.0B parameters, 120 GiB) does not fit an 80 GB card: there
its rows are refused at once.

scripts/bench_utils.py holds the shared recipe, training run and record of where a figure was measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch._dynamo
from bench_utils import MEAN_DOC, gpu_recipe, median_after_warmup, medians, meta, parse_tokens, run_all, train

PRESETS = "llama-3.2-3b,llama-3.1-8b"
AC_MODES = ("none", "full", "selective")
WARMUP = 4
SHORT = 8192  # tokens per step up to which the unchunked loss is the one a run would use
GIB = 2**30


@dataclass(frozen=True)
class Row:
    preset: str
    batch_size: int
    seq_len: int
    ac: str
    chunk: int

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def name(self) -> str:
        loss = f"chunk{self.chunk}" if self.chunk else "nochunk"
        return f"{self.preset}-{self.batch_size}x{self.seq_len}-{self.ac}-{loss}"


def plan(presets: list[str], shapes: list[tuple[int, int]], acs: list[str], chunks: list[int]) -> list[Row]:
    """The rows in the order they run (the module docstring says why)."""
    keyed = []
    for p, preset in enumerate(presets):
        for t, (batch, seq) in enumerate(shapes):
            short = batch * seq <= SHORT
            modes = [m for m in (("none", "selective", "full") if short else ("selective", "full", "none")) if m in acs]
            for chunk in chunks:
                tier = int((chunk != 0) == short)  # 0: the loss setting a run of this size would use
                for m, ac in enumerate(modes):
                    keyed.append(((p, tier, t, m, chunk), Row(preset, batch, seq, ac, chunk)))
    return [row for _, row in sorted(keyed, key=lambda kv: kv[0])]


def config(row: Row, steps: int, run_root: str, compile: bool):
    cfg = gpu_recipe(f"{run_root}/{row.name}", steps, preset=row.preset)
    cfg.model.vocab_from_tokenizer = False
    cfg.data.batch_size, cfg.data.seq_len = row.batch_size, row.seq_len
    cfg.trainer.activation_checkpointing, cfg.trainer.loss_chunk_size = row.ac, row.chunk
    cfg.trainer.compile = compile
    cfg.trainer.device = "cuda" if torch.cuda.is_available() else "cpu"
    return cfg


def memory_floor(cfg) -> dict:
    """The floor of the run's own memory check (Trainer._check_model_fits) for ``cfg``, and the free memory
    it is compared with, in GiB."""
    from nemo_lite.components.models import get_preset
    from nemo_lite.training import run_dir as rundir
    from nemo_lite.training.converters import training_bytes

    model = get_preset(cfg.model.preset, **dict(cfg.model.overrides or {}))
    cuda = cfg.trainer.device == "cuda"
    bf16 = cuda and cfg.trainer.autocast_dtype == "bfloat16"
    state = training_bytes(cfg, model, autocast_dtype=torch.bfloat16 if bf16 else None)
    state = rundir.TRAINING_BYTES_PER_PARAM * rundir.estimate_parameters(model) if state is None else state
    activation_bytes = 2 if cfg.trainer.autocast_dtype == "bfloat16" else 4  # as the run counts, on any device
    step = rundir.StepShape(cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.grad_accum, activation_bytes)
    floor = state + step.batch_bytes() + step.activation_floor(model)
    free = rundir.available_memory("cuda" if cuda else "cpu", 0 if cuda else None)
    return {
        "floor_gib": floor / GIB,
        "state_gib": state / GIB,
        "activation_floor_gib": step.activation_floor(model) / GIB,
        "free_gib": None if free is None else free / GIB,
    }


def loader(cfg, seed: int = 0):
    from nemo_lite.components.models import get_preset
    from nemo_lite.testing.data import SyntheticPackedLoader

    model = get_preset(cfg.model.preset, **dict(cfg.model.overrides or {}))
    return SyntheticPackedLoader(
        cfg.data.batch_size, cfg.data.seq_len, vocab_size=model.vocab_size, eos_id=model.eos_token_id,
        mean_doc=MEAN_DOC, seed=seed, pin_memory=torch.cuda.is_available(),
    )  # fmt: skip


def measure(row: Row, cfg, floor: dict, steps: int) -> dict:
    from nemo_lite.errors import ConfigError

    out = {"config": row.name, "preset": row.preset, "batch_size": row.batch_size, "seq_len": row.seq_len,
           "tokens": row.tokens, "ac": row.ac, "loss_chunk_size": row.chunk, **floor}  # fmt: skip
    try:
        run = train(cfg, loader(cfg))
    except ConfigError as err:  # the run's own check, before anything is allocated
        return out | {"refused": str(err)}
    except torch.OutOfMemoryError as err:
        return out | {"error": f"OutOfMemoryError: {str(err).splitlines()[0][:300]}"}
    records, skip = run.records, min(WARMUP, steps - 1)
    out |= medians(records, skip)
    mfus = [r.get("mfu") for r in records]
    out["mfu"] = median_after_warmup(mfus, skip) if None not in mfus else None
    if torch.cuda.is_available():
        out["peak_mem_gib"] = max([run.setup_peak_gib] + [r["peak_mem_gib"] for r in records])
    else:
        out["peak_rss_gib"] = max(r["peak_rss_gib"] for r in records)
    out |= {"params": run.trainer.n_params, "step": run.trainer.step_impl.description}
    del run
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | tokens | AC | loss chunk | tokens/s | MFU | step ms | peak GiB | floor GiB | loss first -> last |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "preset" not in r:  # an error run_all caught outside the row's own handling
            lines.append(f"| {r['config']} | {r.get('error', '?')} | | | | | | | | |")
            continue
        head = f"| {r['preset']} | {r['batch_size']}x{r['seq_len']} | {r['ac']} | {r['loss_chunk_size'] or '-'} |"
        floor = f"{r['floor_gib']:.1f}"
        if "tokens_per_s" not in r:
            why = r.get("refused") or r.get("error") or r.get("not_started") or "?"
            lines.append(f"{head} {why} | | | | {floor} | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "--"
        peak = r.get("peak_mem_gib", r.get("peak_rss_gib"))
        lines.append(f"{head} {r['tokens_per_s']:.0f} | {mfu} | {r['step_ms']:.0f} | {peak:.1f} | {floor} | "
                     f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default=PRESETS)
    parser.add_argument("--tokens", default="4096,32768")
    parser.add_argument("--ac", default="none,selective,full")
    parser.add_argument("--chunk", default="0,2048")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--out", default="shapes.json")
    parser.add_argument("--run-dir", default="/tmp/bench_shapes")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    from nemo_lite.components.models import get_preset
    from nemo_lite.errors import NemoLiteError

    presets = args.presets.split(",")
    for preset in presets:
        try:
            get_preset(preset)
        except NemoLiteError as err:
            raise SystemExit(f"--presets: {err.args[0]}") from None
    acs = args.ac.split(",")
    if bad := [a for a in acs if a not in AC_MODES]:
        raise SystemExit(f"--ac takes {', '.join(AC_MODES)}; got {', '.join(bad)}")
    try:
        chunks = [int(c) for c in args.chunk.split(",")]
    except ValueError:
        chunks = [-1]
    if min(chunks) < 0:
        raise SystemExit(f"--chunk takes integers >= 0 (0: unchunked loss); got {args.chunk!r}")
    if args.steps < 2:
        raise SystemExit(f"--steps must be at least 2 (one warm-up, one measured); got {args.steps}")
    rows = plan(presets, [parse_tokens(t) for t in args.tokens.split(",")], acs, chunks)

    torch.backends.cuda.matmul.allow_tf32 = True
    cfgs = {row.name: config(row, args.steps, args.run_dir, args.compile) for row in rows}
    floors = {name: memory_floor(cfg) for name, cfg in cfgs.items()}
    print("memory floor of the run's own check (GiB): floor = training state + batches + block inputs", flush=True)
    for name, f in floors.items():
        fits = "?" if f["free_gib"] is None else ("fits" if f["floor_gib"] <= f["free_gib"] else "refused")
        free = "?" if f["free_gib"] is None else f"{f['free_gib']:.1f}"
        print(f"  {name}: {f['floor_gib']:.1f} (state {f['state_gib']:.1f}, block inputs "
              f"{f['activation_floor_gib']:.1f}) of {free} free: {fits}", flush=True)  # fmt: skip

    took: dict[tuple[str, int], float] = {}  # the longest row so far per preset and tokens

    def run_row(row: Row) -> dict:
        left = args.budget_s - (time.perf_counter() - started)
        expect = took.get((row.preset, row.tokens), 0.0)
        if left <= 0 or expect > left:
            return {"config": row.name, "preset": row.preset, "batch_size": row.batch_size, "seq_len": row.seq_len,
                    "tokens": row.tokens, "ac": row.ac, "loss_chunk_size": row.chunk, **floors[row.name],
                    "not_started": f"--budget-s {args.budget_s:.0f}: {max(left, 0):.0f} s left"}  # fmt: skip
        t0 = time.perf_counter()
        try:
            return measure(row, cfgs[row.name], floors[row.name], args.steps)
        finally:
            took[(row.preset, row.tokens)] = max(expect, time.perf_counter() - t0)
            torch._dynamo.reset()  # the row's compiled graphs go with its model
            gc.collect()

    def write(done: list[dict]) -> None:
        Path(args.out).write_text(json.dumps({"meta": meta(), "steps": args.steps, "warmup": WARMUP, "rows": done},
                                             indent=1, default=str))  # fmt: skip

    done = run_all([row.name for row in rows], {row.name: (lambda r=row: run_row(r)) for row in rows}, write)
    print(f"\n{meta()}\n\n{table(done)}")
    return done


if __name__ == "__main__":
    main()
