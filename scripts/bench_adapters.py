"""Adapter fine-tuning on one GPU: nemo_lite's LoRA (peft=lora) and QLoRA (peft.quantize_base=nf4) next to its
full fine-tuning, transformers + PEFT and transformers + PEFT + bitsandbytes 4-bit; same checkpoint, same packed
batches, in one process on one card.

    python scripts/bench_adapters.py [--steps 30] [--configs nemo-lora,nemo-full,hf-peft] [--out results.json]
    python scripts/bench_adapters.py --shape llama-3.1-8b --steps 15 --configs nemo-qlora,hf-bnb-qlora
    python scripts/bench_adapters.py --shape toy --steps 6    # every nemo_lite and PEFT row on a CPU, in a minute

Workload (``--shape``): a checkpoint with random weights (seed 0; written once as a Hugging Face directory, bf16
safetensors, under --ckpt-dir) of Llama-3.2-1B's shape with 2 x 4096 tokens a step (the default), of
Llama-3.1-8B's with 2 x 2048, or ``toy`` (2 blocks of width 256, every block linear whole NF4 groups, 2 x 128),
EOS-delimited documents with fixed-seed log-normal lengths (mean ~600), every row packed. LoRA: r=16, alpha=32,
no dropout, on every linear of the decoder blocks (q, k, v, o, gate, up, down; not the output head), AdamW at lr
2e-4 (full fine-tuning: 3e-5), no weight decay.

Configs (precision the same for all: float32 master weights read from the checkpoint, matmuls under bf16
autocast, the loss in float32):
- ``nemo-lora``, ``nemo-full``: nemo_lite with its frozen linears stored in bf16 (the values autocast would
  compute with), flex attention compiled (trainer.compile=true), the fast step; ``-ac`` repeats them with
  activation checkpointing (trainer.activation_checkpointing=true), where activations no longer dominate.
- ``nemo-qlora``: the base loaded in float32 on the CPU, each frozen block linear quantized to torchao's NF4 (from
  bf16) on the GPU, adapters in float32, activation checkpointing on.
- ``hf-peft``: transformers + PEFT with the model as loaded (float32); ``hf-peft-bf16`` loads its base in bf16
  (PEFT keeps the adapters in float32), as PEFT's documentation suggests for memory.
- ``hf-bnb-qlora``: ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16)``, ``peft.prepare_model_for_kbit_training``
  with gradient checkpointing (non-reentrant): bitsandbytes' recommended QLoRA. Needs bitsandbytes and a GPU;
  recorded as skipped otherwise.
transformers runs its best attention (flash_attention_2 if the flash_attn package is installed, else sdpa;
--hf-attn picks one), packed rows told apart by position_ids, uncompiled, torch's fused AdamW. On a CPU (toy
only) nemo_lite runs sdpa, uncompiled.

Reported per config: median tokens/s over the steps after warm-up (5), the peak memory allocated during the
steps, during set-up (loading, quantizing) and the larger of the two, the most the caching allocator held, the
memory held before the first step, first and last loss; and the ratios: LoRA's peak memory over full
fine-tuning's (without and with checkpointing), LoRA's tokens/s over the best transformers + PEFT row, QLoRA's
overall peak (against 14 GiB at the 8B shape) and its tokens/s and peak over bitsandbytes'.
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
    VOCAB,
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
PEAK_LIMIT_GIB = 14.0  # QLoRA's goal at the 8B shape
TOY = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 8192,
}
# --shape: (preset, overrides, eos id, (rows, tokens a row), the configs run by default)
SHAPES = {
    "llama-3.2-1b": (
        "llama-3.2-1b",
        {},
        EOS,
        (2, 4096),
        "nemo-lora,nemo-full,hf-peft,hf-peft-bf16,nemo-lora-ac,nemo-full-ac",
    ),
    "llama-3.1-8b": ("llama-3.1-8b", {}, EOS, (2, 2048), "nemo-qlora,hf-bnb-qlora"),
    "toy": ("llama-3.1-8b", TOY, 2, (2, 128), "nemo-lora,nemo-full,nemo-qlora,hf-peft,hf-bnb-qlora"),
}


class Workload:
    def __init__(self, shape: str, ckpt_dir: str | None) -> None:
        self.shape = shape
        self.preset, self.overrides, self.eos, self.rows_tokens, _ = SHAPES[shape]
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.ckpt = Path(ckpt_dir or f"/tmp/bench_adapters/{shape}-random")

    @property
    def tokens_per_step(self) -> int:
        return self.rows_tokens[0] * self.rows_tokens[1]

    def loader(self):
        return synthetic_loader(
            vocab_size=self.overrides.get("vocab_size", VOCAB), eos_id=self.eos, shape=self.rows_tokens
        )

    def write_checkpoint(self) -> Path:
        """The random checkpoint every config starts from (written once, bf16)."""
        if (self.ckpt / "config.json").is_file():
            return self.ckpt
        t0 = time.perf_counter()
        model = nemo_model(self.preset, device=self.device, eos_token_id=self.eos, **self.overrides)
        model.to(torch.bfloat16).save_pretrained(self.ckpt)
        del model
        if self.device == "cuda":
            torch.cuda.empty_cache()
        print(f"wrote {self.ckpt} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return self.ckpt


def peaks(setup_gib: float) -> dict:
    """Peak memory allocated during the steps (since the last reset) and during set-up, the larger of the two, and
    the most the caching allocator held (set-up's cached blocks included: nothing empties the cache between)."""
    cuda = torch.cuda.is_available()
    steps_gib = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    return {
        "peak_mem_gib": steps_gib,
        "setup_peak_gib": setup_gib,
        "overall_peak_gib": max(steps_gib, setup_gib),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
    }


def run_nemo(name: str, steps: int, work: Workload, *, lora: bool, ac: bool, nf4: bool = False) -> dict:
    keys = {
        "model.pretrained_path": str(work.write_checkpoint()),
        "data.batch_size": work.rows_tokens[0],
        "data.seq_len": work.rows_tokens[1],
        "trainer.activation_checkpointing": ac,
        "optim.lr": LORA_LR if lora else FULL_LR,
        "optim.weight_decay": 0.0,
    }
    if lora:
        keys |= {"peft.method": "lora", "peft.r": RANK, "peft.alpha": ALPHA, "peft.target_modules": ["all-linear"]}
    if nf4:
        keys["peft.quantize_base"] = "nf4"
    if work.device == "cpu":  # the wiring only: no flex backward and no inductor build on a CPU
        keys |= {"trainer.device": "cpu", "attention.backend": "sdpa", "trainer.compile": False}
    cfg = gpu_recipe(f"/tmp/bench_adapters/{name}", steps, preset=None, recipe="finetune", **keys)
    run = train(cfg, work.loader())
    result = {"config": name, **medians(run.records, min(WARMUP, steps - 1)), **peaks(run.setup_peak_gib)}
    return result | {"activation_checkpointing": ac, "tokens_per_step": work.tokens_per_step, **run_facts(run)}


def run_hf(name: str, steps: int, work: Workload, *, attn: str, base_dtype: torch.dtype, bnb: bool = False) -> dict:
    missing = [n for n in ("peft", "bitsandbytes")[: 1 + bnb] if importlib.util.find_spec(n) is None]
    if missing or (bnb and work.device != "cuda"):
        return {"config": name, "skipped": f"{', '.join(missing)} not importable" if missing else "needs a CUDA GPU"}
    import peft
    import transformers

    ckpt = str(work.write_checkpoint())
    cuda = work.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    lora = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    if bnb:
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=quantization, dtype=base_dtype, attn_implementation=attn, device_map={"": 0}
        )
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=base_dtype, attn_implementation=attn)
        model = model.to(work.device)
    model = peft.get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model_mem = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    setup_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    records = hf_train(model, trainable, steps, lr=LORA_LR, weight_decay=0.0, loader=work.loader())
    return {
        "config": name,
        **medians(records, min(WARMUP, steps - 1)),
        **peaks(setup_peak),
        "model_mem_gib": model_mem,
        "tokens_per_step": work.tokens_per_step,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "attn_implementation": attn,
        "base_dtype": "nf4 (bitsandbytes)" if bnb else str(base_dtype).removeprefix("torch."),
    }


def summary(rows: list[dict]) -> dict:
    by_name = {r["config"]: r for r in rows if "error" not in r and "skipped" not in r}
    out = {}
    cuda = torch.cuda.is_available()  # memory is measured on the GPU only
    lora, full = by_name.get("nemo-lora"), by_name.get("nemo-full")
    if lora and full and cuda:
        out["lora_memory_over_full"] = lora["peak_mem_gib"] / full["peak_mem_gib"]
    lora_ac, full_ac = by_name.get("nemo-lora-ac"), by_name.get("nemo-full-ac")
    if lora_ac and full_ac and cuda:  # both with activation checkpointing
        out["lora_memory_over_full_both_ac"] = lora_ac["peak_mem_gib"] / full_ac["peak_mem_gib"]
    hf = [r for name, r in by_name.items() if name.startswith("hf-peft")]
    if lora and hf:
        best = max(hf, key=lambda r: r["tokens_per_s"])
        out["best_hf_peft"] = best["config"]
        out["lora_tokens_per_s_over_hf_peft"] = lora["tokens_per_s"] / best["tokens_per_s"]
    qlora, bnb = by_name.get("nemo-qlora"), by_name.get("hf-bnb-qlora")
    if qlora and cuda:
        out["nemo_qlora_overall_peak_gib"] = qlora["overall_peak_gib"]
        out["nemo_qlora_peak_within_14_gib"] = qlora["overall_peak_gib"] <= PEAK_LIMIT_GIB
    if qlora and bnb:
        out["tokens_per_s_over_hf_bnb"] = qlora["tokens_per_s"] / bnb["tokens_per_s"]
        out["peak_over_hf_bnb"] = qlora["overall_peak_gib"] / bnb["overall_peak_gib"]
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
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", default=None, help="comma-separated; default: the shape's own set")
    parser.add_argument("--hf-attn", default="auto", help="auto | sdpa | flash_attention_2 | flex_attention")
    parser.add_argument("--ckpt-dir", default=None, help="default: /tmp/bench_adapters/<shape>-random")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Workload(args.shape, args.ckpt_dir)
    if work.device == "cpu" and args.shape != "toy":
        sys.exit(f"bench_adapters.py needs a CUDA GPU for --shape {args.shape}; --shape toy runs on a CPU")
    if work.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch._dynamo.config.cache_size_limit = 64  # several models compiled in one process
    attn = hf_attention(args.hf_attn) if work.device == "cuda" else "sdpa"
    n = args.steps
    runs = {
        "nemo-lora": lambda: run_nemo("nemo-lora", n, work, lora=True, ac=False),
        "nemo-full": lambda: run_nemo("nemo-full", n, work, lora=False, ac=False),
        "nemo-lora-ac": lambda: run_nemo("nemo-lora-ac", n, work, lora=True, ac=True),
        "nemo-full-ac": lambda: run_nemo("nemo-full-ac", n, work, lora=False, ac=True),
        "nemo-qlora": lambda: run_nemo("nemo-qlora", n, work, lora=True, ac=True, nf4=True),
        "hf-peft": lambda: run_hf("hf-peft", n, work, attn=attn, base_dtype=torch.float32),
        "hf-peft-bf16": lambda: run_hf("hf-peft-bf16", n, work, attn=attn, base_dtype=torch.bfloat16),
        "hf-bnb-qlora": lambda: run_hf("hf-bnb-qlora", n, work, attn=attn, base_dtype=torch.bfloat16, bnb=True),
    }
    info = meta() | versions() | {"shape": args.shape}

    def write(rows: list[dict]) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": info, "rows": rows, "summary": summary(rows)}, indent=1))

    rows = run_all((args.configs or SHAPES[args.shape][4]).split(","), runs, write)
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
