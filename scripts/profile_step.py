"""Where the time of nemo_lite's fast compiled bf16 step goes, by kernel class, on one GPU.

    python scripts/profile_step.py [--out DIR] [--preset llama-3.2-1b] [--tokens 2x4096] [--ac none]
        [--start 6] [--steps 3] [--toy] [--trace]

Trains the benchmark workload of ``bench_train.py`` (the 1B shape, 2 x 4096 packed tokens, flex compiled, the
fast step; ``--preset``, ``--tokens`` (N or BxS) and ``--ac`` (trainer.activation_checkpointing) change it, e.g.
to profile a row of ``bench_shapes.py``) with ``trainer.profile_steps`` on, and reads the profiled steps' trace:
GPU time per step by class (matmuls, attention forward and backward, fused triton elementwise, the optimizer,
the loss, communication, other kernels) and the idle gaps inside each step's GPU span
(``nemo_lite.training.profiling.step_breakdown``).
Writes ``DIR/profile_step.json`` (the breakdown, the trainer's own summary, where it ran) and
``DIR/profile_step.md`` (the table); ``--trace`` also ``DIR/trace.json.gz`` (Perfetto). ``--toy``: the tiny
preset on 2 x 256 tokens, uncompiled, on whatever device there is (on a CPU the profile has no kernels: the
table gives the steps' host time).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import torch
from bench_utils import ROWS, SEQ_LEN, gpu_recipe, medians, meta, parse_tokens, synthetic_loader, train

from nemo_lite.training.activation_checkpointing import AC_MODES
from nemo_lite.training.profiling import breakdown_markdown, step_breakdown

AFTER = 5  # steps run after the profiled ones, for the step time without the profiler


def profile(
    out: Path,
    *,
    preset: str,
    start: int,
    steps: int,
    toy: bool,
    trace: bool = False,
    shape: tuple[int, int] = (ROWS, SEQ_LEN),
    ac: str = "none",
) -> dict:
    from nemo_lite.components.models import get_preset

    keys: dict = {"model.vocab_from_tokenizer": False, "trainer.activation_checkpointing": ac}
    if toy:
        from nemo_lite.testing.data import SyntheticPackedLoader

        preset, config = "tiny", get_preset("tiny")
        keys |= {"data.seq_len": 256, "data.batch_size": 2, "trainer.compile": False}
        loader = SyntheticPackedLoader(2, 256, vocab_size=config.vocab_size, eos_id=config.eos_token_id, mean_doc=60)
    else:
        config = get_preset(preset)
        keys |= {"data.batch_size": shape[0], "data.seq_len": shape[1]}
        loader = synthetic_loader(vocab_size=config.vocab_size, eos_id=config.eos_token_id, shape=shape)
    cfg = gpu_recipe("/tmp/profile_step/run", start + steps + AFTER, preset=preset, **keys)
    cfg.trainer.profile_start, cfg.trainer.profile_steps = start, steps
    run = train(cfg, loader, keep=True)
    timed = ("step_ms", "tokens_per_s") + (("mfu",) if run.records[-1].get("mfu") is not None else ())
    profile_dir = Path(cfg.run_dir) / "profile"
    with gzip.open(profile_dir / "trace_rank0.json.gz", "rt") as f:
        breakdown = step_breakdown(json.load(f))
    result = {
        "meta": meta(),
        "preset": preset,
        "tokens": f"{keys['data.batch_size']}x{keys['data.seq_len']}",
        "activation_checkpointing": ac,
        "step": run.trainer.step_impl.description,
        "profiled_steps": f"{start + 1}-{start + steps}",
        "breakdown": breakdown,
        "summary": json.loads((profile_dir / "summary.json").read_text()),
        # the steps after the window, unslowed by the profiler (no MFU without a known peak, e.g. on a CPU)
        **medians(run.records, start + steps, timed),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_step.json").write_text(json.dumps(result, indent=1))
    (out / "profile_step.md").write_text(breakdown_markdown(breakdown))
    if trace:
        shutil.copy(profile_dir / "trace_rank0.json.gz", out / "trace.json.gz")
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="profile_step", help="directory of profile_step.json/.md")
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--tokens", default=f"{ROWS}x{SEQ_LEN}", help="tokens a step: N (one row) or BxS")
    parser.add_argument("--ac", default="none", choices=AC_MODES, help="trainer.activation_checkpointing")
    parser.add_argument("--start", type=int, default=6, help="steps run before the profiled ones (compilation)")
    parser.add_argument("--steps", type=int, default=3, help="steps profiled")
    parser.add_argument("--toy", action="store_true", help="the tiny preset, 2 x 256 tokens, uncompiled")
    parser.add_argument("--trace", action="store_true", help="also copy the Chrome trace to DIR/trace.json.gz")
    args = parser.parse_args()
    if not args.toy and not torch.cuda.is_available():
        sys.exit("profile_step.py profiles the 1B step on a CUDA GPU; --toy runs a tiny model anywhere")
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    result = profile(
        Path(args.out), preset=args.preset, start=args.start, steps=args.steps, toy=args.toy, trace=args.trace,
        shape=parse_tokens(args.tokens), ac=args.ac,
    )  # fmt: skip
    print(f"{result['meta']}\n{result['step']}\n")
    print(breakdown_markdown(result["breakdown"]))


if __name__ == "__main__":
    main()
