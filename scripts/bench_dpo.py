"""DPO training throughput on one GPU: nemo_lite's Trainer (objective=dpo, packed pairs, with and without the
shared prompt) next to TRL's DPOTrainer, same model shape, same pairs, same optimizer, in one process.

    python scripts/bench_dpo.py [--size 1b] [--prompt 1500] [--answer 300] [--pairs 4] [--steps 20]
        [--configs nemo-shared,nemo-separate,trl,trl-precompute] [--out r.json]
    python scripts/bench_dpo.py --size toy --steps 4 --out /tmp/dpo_toy.json   # a CPU check of the script

Workload: Llama-3.2-1B shape (``--size toy``: the tiny preset), random init; every pair has a prompt of
``--prompt`` random tokens and two answers of ``--answer`` tokens each (a new random set of pairs every step);
``--pairs`` pairs per optimizer step; full fine-tuning with a frozen reference copy (DPO's default for it);
bf16 autocast over float32 master weights, AdamW, beta 0.1. Reported per config: median pairs/s and step time
over the steps after warm-up, peak memory.

- ``nemo-shared``: one pair per row, ``prompt chosen p rejected`` under the shared_prompt mask (flex, compiled
  blocks, the fast step); ``nemo-separate``: one pair per row, ``prompt chosen | prompt rejected``,
  block_causal. Rows are ``pair + EOS`` rounded up to a multiple of 128 tokens.
- ``trl``: TRL's DPOTrainer as documented for speed: bf16, sdpa attention, no gradient checkpointing, fused
  AdamW, the reference model kept on the card (``ref_model``). TRL's ``padding_free`` is what it documents as
  fastest, but TRL 1.16 turns it off ("temporarily unavailable", it warns and pads); the run records the
  version and the value it ran with. Its pairs are handed over already tokenized (the same ids).
- ``trl-precompute``: the same with ``precompute_ref_log_probs=True`` (the reference pass runs once over the
  data before training, its time recorded apart and left out of pairs/s).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_utils import gpu_recipe, median_after_warmup, meta, run_all, train

from nemo_lite.components.datasets.packing import DocumentPacker, collate_rows
from nemo_lite.components.datasets.preference import pair_document

WARMUP = 5
SIZES = {"1b": ("llama-3.2-1b", 128001, 128256), "toy": ("tiny", 2, 256)}  # preset, EOS, vocabulary
BETA, LR = 0.1, 1e-6


def pairs_of(step: int, n: int, prompt: int, answer: int, vocab: int, eos: int) -> list[tuple[list[int], ...]]:
    """``n`` random pairs of step ``step`` (the same for every config), ids below ``vocab`` other than ``eos``."""
    rng = random.Random(f"bench_dpo/{step}")
    draw = lambda k: [t if t != eos else t + 1 for t in (rng.randrange(3, vocab - 1) for _ in range(k))]  # noqa: E731
    return [(draw(prompt), draw(answer), draw(answer)) for _ in range(n)]


def row_length(prompt: int, answer: int, shared: bool) -> int:
    tokens = (prompt + 2 * answer + 1 if shared else 2 * (prompt + answer) + 1) + 1  # the pair and its EOS
    return -(-tokens // 128) * 128 - 1  # seq_len: a row is seq_len + 1 tokens before the shift


class PairLoader:
    """What the Trainer reads as ``train_loader``: one packed pair per row, ``pairs`` rows a step, a new set of
    random pairs every step (a few sets, cycled)."""

    record_kind, tokenizer, pairs = "preference", None, True

    def __init__(self, args, *, shared: bool, vocab: int, eos: int) -> None:
        self.eos_id = self.end_id = eos
        self.vocab_size = vocab
        self.seq_len = row_length(args.prompt, args.answer, shared)
        self.batches = []
        for step in range(8):
            packer = DocumentPacker(seq_len=self.seq_len, eos_id=eos, whole_documents=True)
            rows = []
            for pair in pairs_of(step, args.pairs, args.prompt, args.answer, vocab, eos):
                ids, trainable, positions = pair_document(*pair, delimiter_id=eos, shared_prompt=shared)
                packer.push(ids, trainable=trainable, positions=positions or None)
                while not packer.rows_ready:
                    packer.push([eos], trainable=[0])
                rows.append(packer.pop_row())
                packer = DocumentPacker(seq_len=self.seq_len, eos_id=eos, whole_documents=True)
            batch = collate_rows(rows, eos_id=eos, answer_ids=True)
            self.batches.append({k: v.pin_memory() if torch.cuda.is_available() else v for k, v in batch.items()})
        self.step = 0

    def __iter__(self):
        while True:
            yield self.batches[self.step % len(self.batches)]
            self.step += 1

    def prompt_ids(self, text: str) -> list[int]:
        return [self.eos_id]

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def run_nemo(args, *, shared: bool) -> dict:
    preset, eos, vocab = SIZES[args.size]
    loader = PairLoader(args, shared=shared, vocab=vocab, eos=eos)
    gpu = torch.cuda.is_available()
    keys = {
        "recipe": "dpo",
        "objective.name": "dpo",
        "objective.beta": BETA,
        "objective.reference": "copy",
        "optim.lr": LR,
        "optim.warmup_steps": 0,
        "model.vocab_from_tokenizer": False,
        "attention.attn_mask_type": "shared_prompt" if shared else "block_causal",
        "data.shared_prompt": shared,
        "data.seq_len": loader.seq_len,
        "data.batch_size": args.pairs,
        "trainer.compile": gpu,
        "trainer.device": "cuda" if gpu else "cpu",
    }
    if not gpu:
        keys["attention.backend"] = "sdpa"  # flex trains densely on a CPU anyway
    recipe = keys.pop("recipe")
    cfg = gpu_recipe(f"/tmp/bench_dpo/{'shared' if shared else 'separate'}", args.steps, preset=preset, recipe=recipe,
                     **keys)  # fmt: skip
    run = train(cfg, loader)
    step_ms = median_after_warmup((r["step_ms"] for r in run.records), min(WARMUP, args.steps - 1))
    return {
        "config": "nemo-shared" if shared else "nemo-separate",
        "pairs_per_s": args.pairs / (step_ms / 1000),
        "step_ms": step_ms,
        "seq_len": loader.seq_len,
        "tokens_per_pair": loader.seq_len + 1,
        "first_loss": run.records[0]["loss"],
        "last_loss": run.records[-1]["loss"],
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "step": run.trainer.step_impl.description,
        "attention": run.trainer.raw_model.attention_backend.describe(run.trainer.device.type),
    }


def run_trl(args, *, precompute: bool) -> dict:
    import datasets
    import transformers
    import trl
    from trl import DPOConfig, DPOTrainer

    from nemo_lite.components.datasets import build_tokenizer
    from nemo_lite.components.models import get_preset
    from nemo_lite.components.models.hf import config_to_hf

    preset, eos, vocab = SIZES[args.size]
    gpu = torch.cuda.is_available()
    config = transformers.LlamaConfig(**config_to_hf(get_preset(preset)))
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    reference = None if precompute else copy.deepcopy(model).eval()
    pairs = [p for step in range(8) for p in pairs_of(step, args.pairs, args.prompt, args.answer, vocab, eos)]
    dataset = datasets.Dataset.from_list([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])
    tokenizer = build_tokenizer("default")  # only its pad token is read: the pairs come as ids
    out = tempfile.mkdtemp(prefix="bench_dpo_trl")
    dpo_args = DPOConfig(
        output_dir=out, report_to=[], per_device_train_batch_size=args.pairs, max_steps=args.steps, beta=BETA,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6, save_strategy="no",
        bf16=gpu, use_cpu=not gpu, max_length=None, gradient_checkpointing=False, dataloader_num_workers=0,
        optim="adamw_torch_fused" if gpu else "adamw_torch", padding_free=True, precompute_ref_log_probs=precompute,
        loss_type=["sigmoid"], disable_tqdm=True,
    )  # fmt: skip
    times: list[float] = []

    class StepTimes(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if gpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    # The pairs are already token ids: TRL's tokenization step has nothing to do.
    prepare = DPOTrainer._prepare_dataset
    DPOTrainer._prepare_dataset = lambda self, ds, *a, **k: ds
    try:
        t0 = time.perf_counter()
        trainer = DPOTrainer(
            model=model, ref_model=reference, args=dpo_args, train_dataset=dataset, processing_class=tokenizer,
            callbacks=[StepTimes()],
        )  # fmt: skip
        setup_s = time.perf_counter() - t0
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    finally:
        DPOTrainer._prepare_dataset = prepare
        shutil.rmtree(out, ignore_errors=True)  # TRL writes nothing we keep (save_strategy="no")
    step_s = median_after_warmup(times, min(WARMUP, len(times) - 1))
    return {
        "config": "trl-precompute" if precompute else "trl",
        "pairs_per_s": args.pairs / step_s,
        "step_ms": 1000 * step_s,
        "setup_s (precompute pass included)": setup_s,
        "padding_free_ran": trainer.padding_free,
        "trl": trl.__version__,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--prompt", type=int, default=1500, help="prompt tokens per pair")
    parser.add_argument("--answer", type=int, default=300, help="tokens of each answer")
    parser.add_argument("--pairs", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default="nemo-shared,nemo-separate,trl,trl-precompute")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    runs = {
        "nemo-shared": lambda: run_nemo(args, shared=True),
        "nemo-separate": lambda: run_nemo(args, shared=False),
        "trl": lambda: run_trl(args, precompute=False),
        "trl-precompute": lambda: run_trl(args, precompute=True),
    }
    workload = {"size": args.size, "prompt": args.prompt, "answer": args.answer, "pairs_per_step": args.pairs,
                "steps": args.steps, "warmup_steps_left_out": WARMUP}  # fmt: skip

    def write(rows: list[dict]) -> None:
        by = {r["config"]: r.get("pairs_per_s") for r in rows}
        ratios = {}
        if by.get("nemo-shared") and by.get("trl"):
            ratios["nemo-shared / trl"] = by["nemo-shared"] / by["trl"]
        if by.get("nemo-shared") and by.get("nemo-separate"):
            ratios["nemo-shared / nemo-separate"] = by["nemo-shared"] / by["nemo-separate"]
        if args.out is not None:
            report = {"meta": meta(), "workload": workload, "rows": rows, "ratios": ratios}
            args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")

    rows = run_all(args.configs.split(","), runs, write)
    for row in rows:
        print(json.dumps(row, default=str))


if __name__ == "__main__":
    sys.exit(main())
