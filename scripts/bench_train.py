"""End-to-end training throughput on one GPU: nemo_lite's Trainer next to Hugging Face transformers,
same model shape, same packed batches, same optimizer, in the same process on the same card.

    python scripts/bench_train.py [--steps 50] [--configs flex-compile,flex,sdpa,hf-sdpa,hf-flex] [--out r.json]

Workload: Llama-3.2-1B shape, random init, 2 x 4096 tokens per step of
EOS-delimited documents with fixed-seed log-normal lengths (mean ~600; every step a new layout),
bf16 autocast over float32 master weights, AdamW (nemo_lite's fast step unless the config says plain;
transformers runs torch's fused AdamW). Reported per config: median tokens/s over
the steps after warm-up, MFU (6 x params x tokens + the attention FLOPs of the actual document mask,
against 989 TFLOP/s bf16 dense), peak memory, mask-build share of the step, and the number of
graphs compiled after the second step (recompilations).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from bench_utils import median_after_warmup, meta

from nemo_lite.components.datasets.synthetic import SyntheticPackedLoader

EOS = 128001
VOCAB = 128256
PEAK = 989e12


def loader(seed: int = 0):
    return SyntheticPackedLoader(2, 4096, vocab_size=VOCAB, eos_id=EOS, mean_doc=600.0, seed=seed, pin_memory=True)


def attention_pairs(position_ids: torch.Tensor) -> int:
    """Allowed (q, k) pairs of the block-causal mask: each query sees its document's prefix."""
    return int((position_ids + 1).sum())


def run_nemo(
    name: str,
    steps: int,
    *,
    backend: str,
    compile: bool,
    chunk: int = 0,
    ac: bool = False,
    step_impl: str = "auto",
    options: dict | None = None,
    profile: bool = False,
) -> dict:
    from nemo_lite.training.config import RecipeConfig
    from nemo_lite.training.trainer import Trainer

    cfg = RecipeConfig()
    cfg.run_dir = f"/tmp/bench_train/{name}"
    cfg.model.preset = "llama-3.2-1b"
    cfg.model.vocab_from_tokenizer = False
    cfg.attention.backend = backend
    cfg.attention.options = dict(options or {})
    cfg.data.seq_len, cfg.data.batch_size = 4096, 2
    t = cfg.trainer
    t.max_steps, t.compile, t.loss_chunk_size, t.activation_checkpointing = steps, compile, chunk, ac
    t.step_impl = step_impl
    t.val_every = t.save_every = 0
    t.export_hf, t.sample_tokens, t.progress_bar = False, 0, False
    cfg.optim.warmup_steps = 5
    if profile:  # steps 7-9 (left out of the medians below); the trainer writes run_dir/profile/summary.json
        t.profile_start, t.profile_steps = 6, PROFILED_STEPS
    # No run keeps its files: the final checkpoint is ~15 GB, and a few runs would fill the disk.
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    trainer = Trainer(cfg, train_loader=loader())
    trainer.setup()
    torch.cuda.reset_peak_memory_stats()
    records = []
    graphs_after_2 = None

    def after_step(tr, metrics):
        nonlocal graphs_after_2
        records.append(metrics)
        if tr.step == 2:
            graphs_after_2 = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    trainer.hooks["after_step"] = after_step
    trainer.fit()
    kernel_summary = None
    if profile:
        kernel_summary = json.loads((Path(cfg.run_dir) / "profile" / "summary.json").read_text())
        print(json.dumps(kernel_summary, indent=1), file=sys.stderr)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        print(f"graph breaks: {sum(breaks.values())} {breaks}", file=sys.stderr)
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    graphs_end = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    skip = 6 + PROFILED_STEPS if profile else 5
    result = {
        "config": name,
        "tokens_per_s": median_after_warmup((r["tokens_per_s"] for r in records), skip),
        "mfu": median_after_warmup((r["mfu"] for r in records), skip),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mask_ms": median_after_warmup((r["mask_ms"] for r in records), skip),
        "step_ms": median_after_warmup((r["step_ms"] for r in records), skip),
        "recompiles_after_step_2": (graphs_end - graphs_after_2) if graphs_after_2 is not None else None,
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "params": trainer.n_params,
        "step": trainer.step_impl.description,
        "attention_options": cfg.attention.options,
    }
    result["mask_share"] = result["mask_ms"] / result["step_ms"]
    if kernel_summary is not None:
        result["profile"] = kernel_summary
    del trainer
    return result


PROFILED_STEPS = 3


def run_hf(name: str, steps: int, *, attn_implementation: str, compile: bool) -> dict:
    import transformers

    from nemo_lite.components.models import get_preset
    from nemo_lite.components.models.hf import config_to_hf

    hf_cfg = transformers.LlamaConfig(**config_to_hf(get_preset("llama-3.2-1b")))
    hf_cfg._attn_implementation = attn_implementation
    model = transformers.LlamaForCausalLM(hf_cfg).cuda()
    if compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    batches = iter(loader())
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params  # tied embedding counted once
    torch.cuda.reset_peak_memory_stats()
    records = []
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = {k: v.cuda(non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        dt = time.perf_counter() - t0
        tokens = batch["input_ids"].numel()
        attn = attention_pairs(batch["position_ids"]) * 12 * hf_cfg.head_dim * hf_cfg.num_attention_heads
        attn *= hf_cfg.num_hidden_layers
        records.append(
            {
                "tokens_per_s": tokens / dt,
                "mfu": (flops_per_token * tokens + attn) / dt / PEAK,
                "loss": loss_value,
                "step_ms": 1000 * dt,
            }
        )
    result = {
        "config": name,
        "tokens_per_s": median_after_warmup((r["tokens_per_s"] for r in records), 5),
        "mfu": median_after_warmup((r["mfu"] for r in records), 5),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "step_ms": median_after_warmup((r["step_ms"] for r in records), 5),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "params": n_params,
    }
    del model, opt
    return result


CONFIGS = {
    # name: (kind, kwargs)
    "flex-compile": ("nemo", dict(backend="flex", compile=True)),
    "flex-compile-plain": ("nemo", dict(backend="flex", compile=True, step_impl="plain")),
    "flex-compile-chunk": ("nemo", dict(backend="flex", compile=True, chunk=2048)),
    "flex-compile-torchflex": ("nemo", dict(backend="flex", compile=True, options={"kernel_options": "torch"})),
    "flex": ("nemo", dict(backend="flex", compile=False)),
    "varlen-compile": ("nemo", dict(backend="varlen", compile=True)),
    "varlen-nosync-compile": ("nemo", dict(backend="varlen", compile=True, options={"host_sync": False})),
    "sdpa-compile": ("nemo", dict(backend="sdpa", compile=True)),
    "sdpa": ("nemo", dict(backend="sdpa", compile=False)),
    "hf-sdpa": ("hf", dict(attn_implementation="sdpa", compile=False)),
    "hf-flex": ("hf", dict(attn_implementation="flex_attention", compile=False)),
    "hf-flex-compile": ("hf", dict(attn_implementation="flex_attention", compile=True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--configs", default="hf-sdpa,hf-flex,flex,flex-compile,flex-compile-chunk,varlen-compile")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default="", help="comma-separated nemo_lite configs to profile (steps 7-9)")
    parser.add_argument(
        "--inductor-config", default="", help="comma-separated torch._inductor.config settings, e.g. max_autotune=True"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    for setting in filter(None, args.inductor_config.split(",")):
        import torch._inductor.config as inductor_config

        key, value = setting.split("=")
        *path, name = key.split(".")  # e.g. triton.mix_order_reduction_split_size
        section = inductor_config
        for part in path:
            section = getattr(section, part, None)
        if section is None or not hasattr(section, name):
            sys.exit(f"torch._inductor.config has no {key!r}")
        setattr(section, name, json.loads(value.lower()))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # several models and kernel options in one process
    results = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")
        kind, kwargs = CONFIGS[name]
        try:
            if kind == "nemo":
                profile = name in args.profile.split(",")
                row = run_nemo(name, args.steps, profile=profile, **kwargs)
            else:
                row = run_hf(name, args.steps, **kwargs)
        except torch.OutOfMemoryError:
            row = {"config": name, "error": "OOM"}
        except Exception as err:  # record it and go on with the other configs
            row = {"config": name, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(json.dumps(row), file=sys.stderr, flush=True)
        results.append(row)
        gc.collect()
        torch.cuda.empty_cache()
        if args.out:  # after every config, so a time-out keeps what finished
            with open(args.out, "w") as f:
                json.dump({"meta": meta(), "rows": results}, f, indent=1)
    base = next((r["tokens_per_s"] for r in results if r["config"] == "hf-sdpa" and "error" not in r), None)
    print(f"\n{meta()}\n")
    print("| config | tokens/s | vs hf-sdpa | MFU | peak GiB | mask ms (share) | recompiles after step 2 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {r['error']} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        mask = f"{r['mask_ms']:.2f} ({100 * r['mask_share']:.2f}%)" if "mask_ms" in r else "-"
        print(
            f"| {r['config']} | {r['tokens_per_s']:.0f} | {ratio} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_mem_gib']:.1f} | {mask} | {r.get('recompiles_after_step_2', '-')} |"
        )


if __name__ == "__main__":
    main()
