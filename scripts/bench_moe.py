"""Mixture-of-experts training throughput: nemo_lite's Trainer on a Qwen3-MoE shape next to transformers'
Qwen3MoeForCausalLM, same shape, same packed batches, same optimizer, in the same process on the same card.

    python scripts/bench_moe.py [--size gpu|toy] [--steps 30] [--configs ...] [--out r.json]

Workload (``--size gpu``): a Qwen3-MoE of 2.8B parameters that trains on one 80 GB GPU, random init: 24
layers, hidden 1024, 16 query / 4 KV heads of 64, 64 experts of width 512 per layer, top-8 (676M active
parameters), Qwen's vocabulary (151936, untied); 2 x 4096 tokens a step of EOS-delimited documents with
fixed-seed log-normal lengths (mean ~600; a new layout every step), bf16 autocast over float32 master
weights, AdamW, clip 1.0. ``--size toy`` is a few-layer model of the same kind on the CPU (it checks that
every config runs; its figures mean nothing).

Configs: ``flex-compile`` (nemo_lite: flex attention, compiled blocks, grouped experts), ``flex`` (not
compiled), ``flex-compile-loop`` (the per-expert loop instead of the grouped GEMM); ``hf-grouped_mm`` and
``hf-grouped_mm-compile`` (transformers' grouped_mm experts, its fastest for training; sdpa attention with
documents told apart by position_ids), ``hf-eager`` (its per-expert loop). Reported per config: median tokens/s
after warm-up, MFU on the *active* parameters (6 x active parameters x tokens + the attention FLOPs of the
document mask, against 989 TFLOP/s bf16 dense), peak memory, and graphs compiled after the second step
(recompilations).

LoRA on the gpt-oss-20b shape (random bf16 weights built on the GPU, r=16 on q/k/v/o, the experts frozen in
bf16), the same loop for both sides (bf16 autocast, AdamW on the adapters, clip 1.0) on the same batches:
``lora-gpt-oss-compile`` and ``lora-gpt-oss`` (nemo_lite: flex attention with sinks and windows, grouped
experts, PEFT's layers injected) against ``hf-peft-gpt-oss-compile`` and ``hf-peft-gpt-oss`` (transformers'
GptOssForCausalLM with flex_attention and grouped_mm experts, ``peft.get_peft_model``); needs peft. MFU there
counts 4 FLOPs per active parameter (no weight gradient on the frozen ones).

    python scripts/bench_moe.py --configs lora-gpt-oss-compile,hf-peft-gpt-oss,hf-peft-gpt-oss-compile
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch._dynamo

PEAK_FLOPS = 989e12  # H100 and H200, bf16 dense
WARMUP = 5
EOS = 151645

SHAPES = {
    "gpu": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        moe_intermediate_size=512,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=64,
        num_experts_per_tok=8,
    ),
    "toy": dict(
        vocab_size=EOS + 1,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
    ),
}
ROWS = {"gpu": (2, 4096), "toy": (2, 128)}


def moe_config(size: str):
    from nemo_lite.components.models import get_preset

    return get_preset("qwen3-30b-a3b", **SHAPES[size], eos_token_id=EOS)


def loader(size: str):
    from nemo_lite.testing.data import SyntheticPackedLoader

    rows, seq_len = ROWS[size]
    return SyntheticPackedLoader(
        rows,
        seq_len,
        vocab_size=SHAPES[size]["vocab_size"],
        eos_id=EOS,
        mean_doc=600.0 if size == "gpu" else 40.0,
        pin_memory=torch.cuda.is_available(),
    )


def graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def run_nemo(size: str, steps: int, *, compile: bool, impl: str = "auto") -> dict:
    from nemo_lite.components.models.moe import experts_implementation
    from nemo_lite.testing.hooks import after_each_step
    from nemo_lite.training import run_dir
    from nemo_lite.training.config import RecipeConfig
    from nemo_lite.training.trainer import Trainer

    cuda = torch.cuda.is_available()
    cfg = RecipeConfig(recipe="pretrain")
    cfg.run_dir = f"/tmp/bench_moe/nemo-{compile}-{impl}"
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    cfg.model.preset, cfg.model.vocab_from_tokenizer = "qwen3-30b-a3b", False
    cfg.model.overrides = {**SHAPES[size], "eos_token_id": EOS}
    cfg.attention.backend = "flex" if cuda else "sdpa"
    cfg.data.batch_size, cfg.data.seq_len = ROWS[size]
    t = cfg.trainer
    t.max_steps, t.compile = steps, compile and cuda
    t.val_every = t.save_every = t.sample_tokens = 0
    t.export_hf = t.progress_bar = False
    cfg.optim.warmup_steps = 5
    run_dir.FREE_SPACE_FACTOR = 0  # nothing is written
    trainer = Trainer(cfg, train_loader=loader(size))
    trainer.setup()
    trainer.save = lambda: None
    experts_implementation(trainer.raw_model, impl)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    records, after_2 = [], []

    def after_step(tr, metrics: dict) -> None:
        records.append(metrics)
        if tr.step == 2:
            after_2.append(graphs())

    after_each_step(trainer, after_step)
    trainer.fit()
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    return {
        **medians(records),
        "mfu": statistics.median(r["mfu"] for r in records[WARMUP:]) if records[0]["mfu"] is not None else None,
        "recompiles_after_step_2": graphs() - after_2[0] if after_2 else None,
        "expert_load_imbalance": records[-1]["expert_load_imbalance"],
        "step": trainer.step_impl.description,
    }


def run_hf(size: str, steps: int, *, experts: str, compile: bool) -> dict:
    import transformers

    from nemo_lite.components.models.hf import config_to_hf
    from nemo_lite.components.models.moe import num_parameters

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = moe_config(size)
    hf_config = transformers.Qwen3MoeConfig(**config_to_hf(config))
    hf_config._attn_implementation = "sdpa"
    hf_config._experts_implementation = experts
    model = transformers.Qwen3MoeForCausalLM(hf_config).to(device)
    params = list(model.parameters())
    fused = device == "cuda"
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused)
    forward = torch.compile(model) if compile else model
    active = num_parameters(config, active=True) - config.vocab_size * config.hidden_size  # not the lookup
    per_pair = 12 * config.head_dim * config.num_attention_heads * config.num_hidden_layers
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    records, after_2 = [], []
    batches = iter(loader(size))
    model.train()
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = forward(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        dt = time.perf_counter() - t0
        tokens, pairs = batch["input_ids"].numel(), int((batch["position_ids"] + 1).sum())
        flops = 6 * active * tokens + per_pair * pairs
        mfu = flops / dt / PEAK_FLOPS
        records.append({"tokens_per_s": tokens / dt, "step_ms": 1000 * dt, "loss": value, "mfu": mfu})
        if step == 2:
            after_2.append(graphs())
    return {
        **medians(records),
        "mfu": statistics.median(r["mfu"] for r in records[WARMUP:]) if device == "cuda" else None,
        "recompiles_after_step_2": graphs() - after_2[0] if after_2 else None,
    }


def medians(records: list[dict]) -> dict:
    kept = records[WARMUP:] or records
    out = {key: statistics.median(r[key] for r in kept) for key in ("tokens_per_s", "step_ms")}
    out |= {"first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}
    if torch.cuda.is_available():
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---- LoRA on the gpt-oss-20b shape (random bf16 weights): nemo_lite + PEFT's layers vs transformers + PEFT ----

LORA_SHAPES = {
    "gpu": {},  # the gpt-oss-20b preset itself
    "toy": dict(vocab_size=4096, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, num_experts=8, eos_token_id=4095, pad_token_id=4094),
}  # fmt: skip
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def lora_model_config(size: str):
    from nemo_lite.components.models import get_preset

    return get_preset("gpt-oss-20b", **LORA_SHAPES[size])


def lora_loader(size: str):
    from nemo_lite.testing.data import SyntheticPackedLoader

    config = lora_model_config(size)
    rows, seq_len = ROWS[size]
    return SyntheticPackedLoader(
        rows, seq_len, vocab_size=config.vocab_size, eos_id=config.eos_token_id,
        mean_doc=600.0 if size == "gpu" else 40.0, pin_memory=torch.cuda.is_available(),
    )  # fmt: skip


def lora_loop(model, forward, params, size: str, steps: int, flops_per_token: int) -> dict:
    """The same loop for both: bf16 autocast (GPU), summed token loss over the labels, clip 1.0, AdamW."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=device == "cuda")
    batches = iter(lora_loader(size))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    records, after_2 = [], []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        dt = time.perf_counter() - t0
        tokens = batch["input_ids"].numel()
        mfu = flops_per_token * tokens / dt / PEAK_FLOPS
        records.append({"tokens_per_s": tokens / dt, "step_ms": 1000 * dt, "loss": value, "mfu": mfu})
        if step == 2:
            after_2.append(graphs())
    return {
        **medians(records),
        "mfu": statistics.median(r["mfu"] for r in records[WARMUP:]) if device == "cuda" else None,
        "recompiles_after_step_2": graphs() - after_2[0] if after_2 else None,
        "trainable": sum(p.numel() for p in params),
    }


def lora_flops(config) -> int:
    """Active parameters without the embedding lookup, 4 FLOPs each a token (frozen: no weight gradient);
    the adapters' few are left out on both sides."""
    from nemo_lite.components.models.moe import num_parameters

    return 4 * (num_parameters(config, active=True) - config.vocab_size * config.hidden_size)


def run_nemo_lora(size: str, steps: int, *, compile: bool) -> dict:
    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.components.models import get_model_family
    from nemo_lite.training.converters.lora import LoraConverter, PeftSection
    from nemo_lite.training.loss import cross_entropy_sum

    cuda = torch.cuda.is_available()
    family, config = get_model_family("gpt_oss"), lora_model_config(size)
    attention = AttentionConfig(backend="flex" if cuda else "sdpa", attn_mask_type="block_causal")
    with torch.device("meta"):
        model = family.build(config, attention=attention)
    model.to(dtype=torch.bfloat16 if cuda else torch.float32)  # random weights, built in place: bf16 on the GPU
    model.to_empty(device="cuda" if cuda else "cpu")
    model.init_weights(seed=0)
    section = PeftSection(method="lora", r=16, alpha=32.0, target_modules=list(LORA_TARGETS))
    LoraConverter(section, frozen_dtype=torch.bfloat16 if cuda else None).convert(model, family)
    if compile and cuda:
        for unit in family.compile_units(model):
            unit.compile(dynamic=False)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward(batch):
        mask = model.build_attention_mask(batch["input_ids"])
        hidden = model.forward_hidden(batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask)
        loss = cross_entropy_sum(hidden, model.output_weight, batch["labels"], compiled=compile and cuda)
        return loss / (batch["labels"] != -100).sum()

    return lora_loop(model, forward, params, size, steps, lora_flops(config))


def run_hf_lora(size: str, steps: int, *, compile: bool) -> dict:
    import peft
    import transformers

    from nemo_lite.components.models.hf import config_to_hf

    cuda = torch.cuda.is_available()
    config = lora_model_config(size)
    hf_config = transformers.GptOssConfig(**config_to_hf(config))
    hf_config._attn_implementation = "flex_attention" if cuda else "eager"  # sdpa cannot take sinks
    hf_config._experts_implementation = "grouped_mm" if cuda else "eager"
    model = transformers.GptOssForCausalLM._from_config(hf_config, dtype=torch.bfloat16 if cuda else torch.float32)
    model = peft.get_peft_model(model.to("cuda" if cuda else "cpu"), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS), bias="none"
    ))  # fmt: skip
    forward_model = torch.compile(model) if compile and cuda else model
    params = [p for p in model.parameters() if p.requires_grad]

    def forward(batch):
        logits = forward_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())

    return lora_loop(model, forward, params, size, steps, lora_flops(config))


CONFIGS = {
    "flex-compile": (run_nemo, {"compile": True}),
    "flex": (run_nemo, {"compile": False}),
    "flex-compile-loop": (run_nemo, {"compile": True, "impl": "loop"}),
    "hf-grouped_mm-compile": (run_hf, {"experts": "grouped_mm", "compile": True}),
    "hf-grouped_mm": (run_hf, {"experts": "grouped_mm", "compile": False}),
    "hf-eager": (run_hf, {"experts": "eager", "compile": False}),
    # LoRA on the gpt-oss-20b shape (attention q/k/v/o, r=16), transformers + PEFT as the baseline
    "lora-gpt-oss-compile": (run_nemo_lora, {"compile": True}),
    "lora-gpt-oss": (run_nemo_lora, {"compile": False}),
    "hf-peft-gpt-oss-compile": (run_hf_lora, {"compile": True}),
    "hf-peft-gpt-oss": (run_hf_lora, {"compile": False}),
}


def meta(size: str) -> dict:
    import transformers

    from nemo_lite.components.models.moe import num_parameters

    config = moe_config(size)
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "shape": SHAPES[size],
        "rows_x_seq": ROWS[size],
        "parameters": num_parameters(config),
        "active_parameters": num_parameters(config, active=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SHAPES), default="gpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", default="hf-grouped_mm,hf-grouped_mm-compile,flex,flex-compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.size == "gpu" and not torch.cuda.is_available():
        sys.exit("--size gpu needs a CUDA GPU; --size toy runs on the CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # several models in one process
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        run, kw = CONFIGS[name]
        t0 = time.perf_counter()
        try:
            row = {"config": name, **run(args.size, args.steps, **kw)}
        except torch.OutOfMemoryError:
            row = {"config": name, "error": "OOM"}
        except Exception as err:  # record it and go on with the other configs
            row = {"config": name, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        row["seconds"] = time.perf_counter() - t0
        print(json.dumps(row, default=str), file=sys.stderr, flush=True)
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta(args.size), "rows": rows}, indent=1, default=str))

    def baseline(name: str) -> float | None:  # the best transformers row of the same workload
        same = [r for r in rows if r["config"].startswith("hf-") and ("gpt-oss" in r["config"]) == ("gpt-oss" in name)]
        return max((r["tokens_per_s"] for r in same if "error" not in r), default=None)

    print(f"\n{json.dumps(meta(args.size))}\n")
    print("| config | tokens/s | vs best transformers | MFU (active) | peak GiB | recompiles after step 2 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['error']} | | | | |")
            continue
        base = baseline(r["config"])
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        peak = f"{r['peak_mem_gib']:.1f}" if "peak_mem_gib" in r else "-"
        recompiles = r["recompiles_after_step_2"]
        print(f"| {r['config']} | {r['tokens_per_s']:.0f} | {ratio} | {mfu} | {peak} | {recompiles} |")


if __name__ == "__main__":
    main()
