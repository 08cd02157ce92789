"""QLoRA on one GPU: nemo_lite's peft=lora with peft.quantize_base=nf4 (torchao's NF4) against transformers + PEFT +
bitsandbytes 4-bit in its recommended configuration, same checkpoint, same packed batches, in one process.

    python scripts/bench_qlora.py [--steps 20] [--configs nemo-qlora,hf-bnb-qlora] [--out results.json]
    python scripts/bench_qlora.py --shape toy --steps 6      # the wiring on a CPU, in a minute

Workload: a Llama-3.1-8B-shaped checkpoint with random weights (written once as a Hugging Face directory, bf16
safetensors, under --ckpt-dir), 2 x 2048 tokens per step of EOS-delimited documents with fixed-seed log-normal
lengths (mean ~600), every row packed. LoRA: r=16, alpha=32, no dropout, on every linear of the decoder blocks
(q, k, v, o, gate, up, down; not the output head), AdamW at lr 2e-4. Activation checkpointing on both sides.

- ``nemo-qlora``: the base loaded in float32 on the CPU, each frozen block linear quantized to NF4 (from bf16, as
  the run autocasts to bf16) on the GPU, adapters in float32; flex attention, compiled blocks, the fast step.
- ``hf-bnb-qlora``: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=bfloat16)``, ``peft.prepare_model_for_kbit_training`` with gradient checkpointing
  (non-reentrant), ``get_peft_model``; its best attention (flash_attention_2 if installed, else sdpa; --hf-attn),
  packed rows told apart by position_ids, bf16 autocast, uncompiled (bitsandbytes' 4-bit layers are not what
  torch.compile is recommended for), torch's fused AdamW. Needs bitsandbytes and peft; skipped (recorded) otherwise.

Reported per config: median tokens/s over the steps after warm-up (5), the peak memory allocated during the steps,
during set-up (loading and quantizing) and the larger of the two, the most memory torch's caching allocator held
during the steps, the memory held before the first step, first and last loss; and the summary: nemo_lite's overall
peak against 14 GiB and its tokens/s over the baseline's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from bench_utils import (
    EOS,
    MEAN_DOC,
    VOCAB,
    gpu_recipe,
    hf_attention,
    hf_train,
    medians,
    meta,
    nemo_model,
    run_all,
    run_facts,
    train,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, LR = 16, 32.0, 2e-4
ROWS, WARMUP = 2, 5
PEAK_LIMIT_GIB = 14.0
# --shape: (preset, overrides, eos id, tokens per row). toy: every block linear is whole NF4 groups (64 x 256).
SHAPES = {
    "llama-3.1-8b": ("llama-3.1-8b", {}, EOS, 2048),
    "toy": (
        "llama-3.1-8b",
        {
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "vocab_size": 8192,
        },
        2,
        128,
    ),
}


def loader(seq_len: int, vocab_size: int, eos_id: int):
    from nemo_lite.testing.data import SyntheticPackedLoader

    cuda = torch.cuda.is_available()
    return SyntheticPackedLoader(
        ROWS, seq_len, vocab_size=vocab_size, eos_id=eos_id, mean_doc=MEAN_DOC, seed=0, pin_memory=cuda
    )


def write_checkpoint(path: Path, shape: str, device: str) -> Path:
    """The random checkpoint both configs start from (written once, bf16)."""
    if (path / "config.json").is_file():
        return path
    preset, overrides, eos, _ = SHAPES[shape]
    t0 = time.perf_counter()
    model = nemo_model(preset, device=device, eos_token_id=eos, **overrides)
    model.to(torch.bfloat16).save_pretrained(path)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def peaks(steps_gib: float, setup_gib: float) -> dict:
    """Peak memory allocated during the steps and during set-up, the larger of the two, and the most the caching
    allocator held during the steps (set-up's cached blocks included, as nothing empties the cache between)."""
    reserved = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0
    return {
        "peak_mem_gib": steps_gib,
        "setup_peak_gib": setup_gib,
        "overall_peak_gib": max(steps_gib, setup_gib),
        "peak_reserved_gib": reserved,
    }


def run_nemo(steps: int, ckpt: Path, *, shape: str, cpu: bool) -> dict:
    _, overrides, eos, seq_len = SHAPES[shape]
    keys = {
        "model.pretrained_path": str(ckpt),
        "data.seq_len": seq_len,
        "trainer.activation_checkpointing": True,
        "optim.lr": LR,
        "optim.weight_decay": 0.0,
        "peft.method": "lora",
        "peft.r": RANK,
        "peft.alpha": ALPHA,
        "peft.target_modules": ["all-linear"],
        "peft.quantize_base": "nf4",
    }
    if cpu:  # the wiring only: no flex backward and no inductor build on a CPU
        keys |= {"trainer.device": "cpu", "attention.backend": "sdpa", "trainer.compile": False}
    cfg = gpu_recipe("/tmp/bench_qlora/nemo-qlora", steps, preset=None, recipe="finetune", **keys)
    run = train(cfg, loader(seq_len, overrides.get("vocab_size", VOCAB), eos))
    steps_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {
        "config": "nemo-qlora",
        **medians(run.records, min(WARMUP, steps - 1)),
        **peaks(steps_gib, run.setup_peak_gib),
        "tokens_per_step": ROWS * seq_len,
        **run_facts(run),
    }


def run_hf_bnb(steps: int, ckpt: Path, *, shape: str, attn: str) -> dict:
    missing = [name for name in ("bitsandbytes", "peft") if importlib.util.find_spec(name) is None]
    if missing or not torch.cuda.is_available():
        why = f"{', '.join(missing)} not importable" if missing else "needs a CUDA GPU"
        return {"config": "hf-bnb-qlora", "skipped": why}
    import peft
    import transformers

    _, overrides, eos, seq_len = SHAPES[shape]
    torch.cuda.reset_peak_memory_stats()
    quantization = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(ckpt), quantization_config=quantization, dtype=torch.bfloat16, attn_implementation=attn, device_map={"": 0}
    )
    model = peft.prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    model_mem, setup_peak = torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    batches = loader(seq_len, overrides.get("vocab_size", VOCAB), eos)
    records = hf_train(model, trainable, steps, lr=LR, weight_decay=0.0, loader=batches)
    return {
        "config": "hf-bnb-qlora",
        **medians(records, min(WARMUP, steps - 1)),
        **peaks(torch.cuda.max_memory_allocated() / 2**30, setup_peak),
        "model_mem_gib": model_mem,
        "tokens_per_step": ROWS * seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "attn_implementation": attn,
    }


def summary(rows: list[dict]) -> dict:
    by_name = {r["config"]: r for r in rows if "error" not in r and "skipped" not in r}
    ours, theirs = by_name.get("nemo-qlora"), by_name.get("hf-bnb-qlora")
    out = {}
    if ours and torch.cuda.is_available():
        out["nemo_qlora_overall_peak_gib"] = ours["overall_peak_gib"]
        out["nemo_qlora_peak_within_14_gib"] = ours["overall_peak_gib"] <= PEAK_LIMIT_GIB
    if ours and theirs:
        out["tokens_per_s_over_hf_bnb"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
        out["peak_over_hf_bnb"] = ours["overall_peak_gib"] / theirs["overall_peak_gib"]
    return out


def versions() -> dict:
    out = {}
    for name in ("torchao", "peft", "bitsandbytes"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default="nemo-qlora,hf-bnb-qlora")
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--hf-attn", default="auto", help="auto | sdpa | flash_attention_2")
    parser.add_argument("--ckpt-dir", default=None, help="default: /tmp/bench_qlora/<shape>-random")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and args.shape != "toy":
        sys.exit("bench_qlora.py needs a CUDA GPU for the 8B shape; --shape toy runs the wiring on a CPU")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64
    ckpt = write_checkpoint(
        Path(args.ckpt_dir or f"/tmp/bench_qlora/{args.shape}-random"), args.shape, "cuda" if cuda else "cpu"
    )
    runs = {
        "nemo-qlora": lambda: run_nemo(args.steps, ckpt, shape=args.shape, cpu=not cuda),
        "hf-bnb-qlora": lambda: run_hf_bnb(args.steps, ckpt, shape=args.shape, attn=hf_attention(args.hf_attn)),
    }
    info = meta() | versions() | {"shape": args.shape}

    def write(rows: list[dict]) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": info, "rows": rows, "summary": summary(rows)}, indent=1))

    rows = run_all(args.configs.split(","), runs, write)
    print(f"\n{info}\n")
    print("| config | tokens/s | peak GiB (steps / set-up) | before step 1 GiB | trainable | first -> last loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r or "skipped" in r:
            print(f"| {r['config']} | {r.get('error') or 'skipped: ' + r['skipped']} | | | | |")
            continue
        print(
            f"| {r['config']} | {r['tokens_per_s']:.0f} | {r['peak_mem_gib']:.1f} / {r['setup_peak_gib']:.1f} | "
            f"{r['model_mem_gib']:.1f} | {r['trainable_params'] / 1e6:.1f}M | "
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    print(json.dumps(summary(rows), indent=1))


if __name__ == "__main__":
    main()
