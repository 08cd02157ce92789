"""LoRA on one GPU: nemo_lite's peft=lora against nemo_lite's full fine-tuning and against transformers + PEFT,
same checkpoint, same packed batches, in one process on one card.

    python scripts/bench_lora.py [--steps 30] [--configs nemo-lora,nemo-full,hf-peft] [--out results.json]

Workload: a Llama-3.2-1B-shaped checkpoint with random weights (seed 0; written once as a Hugging Face
directory, bf16 safetensors, under --ckpt-dir), 2 x 4096 tokens per step of EOS-delimited documents with
fixed-seed log-normal lengths (mean ~600), every row packed. LoRA: r=16, alpha=32, no dropout, on every linear
of the decoder blocks (q, k, v, o, gate, up, down; not the output head), AdamW at lr 2e-4.

Precision, the same for every config: float32 master weights read from the checkpoint, matmuls under bf16
autocast, the loss in float32. nemo_lite stores its *frozen* linears in bf16 (the values autocast would
compute with; the merged export reads the float32 base from disk again); transformers + PEFT keeps the model
as loaded (float32), with ``--hf-base-dtype bfloat16`` loading its base in bf16 instead (PEFT then keeps the
adapters in float32), the way its documentation suggests for memory. nemo_lite runs flex attention compiled
(trainer.compile=true) and its fast step; transformers runs the best attention available
(flash_attention_2 if the flash_attn package is installed, else sdpa; --hf-attn picks one), packed rows
told apart by position_ids, uncompiled, torch's fused AdamW.

Reported per config: median tokens/s over the steps after warm-up (5), peak memory (allocated, after the
model is built), the memory held before the first step (weights, optimizer state), first and last loss;
and two ratios: LoRA's peak memory over full fine-tuning's and LoRA's tokens/s over transformers + PEFT's.
The ``-ac`` configs repeat nemo_lite's two with activation checkpointing (trainer.activation_checkpointing=true),
where activations no longer dominate the peak.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from bench_utils import (
    EOS,
    gpu_recipe,
    hf_attention,
    hf_train,
    medians,
    meta,
    nemo_model,
    run_all,
    run_facts,
    synthetic_loader,
    train,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LORA_LR, FULL_LR = 16, 32.0, 2e-4, 3e-5
WARMUP = 5


def write_checkpoint(path: Path) -> Path:
    """The random Llama-3.2-1B-shaped checkpoint every config starts from (written once)."""
    if (path / "config.json").is_file():
        return path
    t0 = time.perf_counter()
    model = nemo_model(eos_token_id=EOS)
    model.to(torch.bfloat16).save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def run_nemo(name: str, steps: int, ckpt: Path, *, lora: bool, ac: bool = False) -> dict:
    keys = {"model.pretrained_path": str(ckpt), "trainer.activation_checkpointing": ac}
    keys |= {"optim.lr": LORA_LR if lora else FULL_LR, "optim.weight_decay": 0.0}
    if lora:
        keys |= {"peft.method": "lora", "peft.r": RANK, "peft.alpha": ALPHA, "peft.target_modules": ["all-linear"]}
    run = train(
        gpu_recipe(f"/tmp/bench_lora/{name}", steps, preset=None, recipe="finetune", **keys), synthetic_loader()
    )
    result = {"config": name, **medians(run.records, WARMUP), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    return result | {"activation_checkpointing": ac, **run_facts(run)}


def run_hf_peft(name: str, steps: int, ckpt: Path, *, attn: str, base_dtype: torch.dtype) -> dict:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=base_dtype, attn_implementation=attn)
    model = peft.get_peft_model(
        model.cuda(), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    model_mem = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    records = hf_train(model, trainable, steps, lr=LORA_LR, weight_decay=0.0)
    result = {"config": name, **medians(records, WARMUP), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    return result | {
        "model_mem_gib": model_mem / 2**30,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "attn_implementation": attn,
        "base_dtype": str(base_dtype).removeprefix("torch."),
    }


def summary(rows: list[dict]) -> dict:
    by_name = {r["config"]: r for r in rows if "error" not in r}
    lora, full = by_name.get("nemo-lora"), by_name.get("nemo-full")
    hf = [r for name, r in by_name.items() if name.startswith("hf-peft")]
    out = {}
    if lora and full:
        out["lora_memory_over_full"] = lora["peak_mem_gib"] / full["peak_mem_gib"]
    lora_ac, full_ac = by_name.get("nemo-lora-ac"), by_name.get("nemo-full-ac")
    if lora_ac and full_ac:  # both with activation checkpointing
        out["lora_memory_over_full_both_ac"] = lora_ac["peak_mem_gib"] / full_ac["peak_mem_gib"]
    if lora and hf:
        best = max(hf, key=lambda r: r["tokens_per_s"])
        out["best_hf_peft"] = best["config"]
        out["lora_tokens_per_s_over_hf_peft"] = lora["tokens_per_s"] / best["tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", default="nemo-lora,nemo-full,hf-peft,hf-peft-bf16,nemo-lora-ac,nemo-full-ac")
    parser.add_argument("--hf-attn", default="auto", help="auto | sdpa | flash_attention_2 | flex_attention")
    parser.add_argument("--ckpt-dir", default="/tmp/bench_lora/llama-3.2-1b-random")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_lora.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # two models compiled in one process
    ckpt = write_checkpoint(Path(args.ckpt_dir))
    attn = hf_attention(args.hf_attn)
    runs = {
        "nemo-lora": lambda: run_nemo("nemo-lora", args.steps, ckpt, lora=True),
        "nemo-full": lambda: run_nemo("nemo-full", args.steps, ckpt, lora=False),
        "nemo-lora-ac": lambda: run_nemo("nemo-lora-ac", args.steps, ckpt, lora=True, ac=True),
        "nemo-full-ac": lambda: run_nemo("nemo-full-ac", args.steps, ckpt, lora=False, ac=True),
        "hf-peft": lambda: run_hf_peft("hf-peft", args.steps, ckpt, attn=attn, base_dtype=torch.float32),
        "hf-peft-bf16": lambda: run_hf_peft("hf-peft-bf16", args.steps, ckpt, attn=attn, base_dtype=torch.bfloat16),
    }

    def write(rows: list[dict]) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta(), "rows": rows, "summary": summary(rows)}, indent=1))

    rows = run_all(args.configs.split(","), runs, write)
    print(f"\n{meta()}\n")
    print("| config | tokens/s | peak GiB | before step 1 GiB | trainable | first -> last loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['error']} | | | | |")
            continue
        print(
            f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['peak_mem_gib']:.1f} | {r['model_mem_gib']:.1f} | "
            f"{r['trainable_params'] / 1e6:.1f}M | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    print(json.dumps(summary(rows), indent=1))


if __name__ == "__main__":
    main()
