"""End-to-end training throughput on one GPU: nemo_lite's Trainer next to Hugging Face transformers,
same model shape, same packed batches, same optimizer, in the same process on the same card.

    python scripts/bench_train.py [--steps 50] [--configs flex-compile,flex,sdpa,hf-sdpa,hf-flex] [--out r.json]
        [--profile flex-compile]

Workload: Llama-3.2-1B shape, random init, 2 x 4096 tokens per step of
EOS-delimited documents with fixed-seed log-normal lengths (mean ~600; every step a new layout),
bf16 autocast over float32 master weights, AdamW (nemo_lite's fast step unless the config says plain;
transformers runs torch's fused AdamW). Reported per config: median tokens/s over
the steps after warm-up, MFU (6 x params x tokens + the attention FLOPs of the actual document mask,
against 989 TFLOP/s bf16 dense), peak memory, mask-build share of the step, and the number of
graphs compiled after the second step (recompilations). --profile writes a kernel summary of steps 7-9.
`torchtitan-compile` runs torchtitan's llama3 model and training step on the same batches where torchtitan is
importable (scripts/torchtitan_peer.py says what runs; 0.2.x has an untied output projection, so compare it
with `flex-compile-untied`); its MFU is given by nemo_lite's definition, and by torchtitan's (full attention).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch._dynamo
from bench_utils import (
    EOS,
    PEAK_FLOPS,
    ROWS,
    SEQ_LEN,
    gpu_recipe,
    hf_model,
    hf_train,
    medians,
    meta,
    run_all,
    synthetic_loader,
    train,
)

PROFILED_STEPS = 3
WARMUP = 5


def run_nemo(name: str, steps: int, *, profile: bool = False, **keys) -> dict:
    cfg = gpu_recipe(f"/tmp/bench_train/{name}", steps, **{"model.vocab_from_tokenizer": False, **keys})
    if profile:  # steps 7-9 (left out of the medians below); the trainer writes run_dir/profile/summary.json
        cfg.trainer.profile_start, cfg.trainer.profile_steps = 6, PROFILED_STEPS
    graphs_after_2 = []

    def on_step(trainer) -> None:
        if trainer.step == 2:
            graphs_after_2.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    run = train(cfg, synthetic_loader(), keep=profile, on_step=on_step)
    trainer, records = run.trainer, run.records
    graphs_end = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    skip = 6 + PROFILED_STEPS if profile else WARMUP
    result = {"config": name, **medians(records, skip, ("tokens_per_s", "mfu", "mask_ms", "step_ms"))}
    result |= {
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "recompiles_after_step_2": graphs_end - graphs_after_2[0] if graphs_after_2 else None,
        "params": trainer.n_params,
        "step": trainer.step_impl.description,
        "attention_options": cfg.attention.options,
        "mask_share": result["mask_ms"] / result["step_ms"],
    }
    if profile:
        result["profile"] = json.loads((Path(cfg.run_dir) / "profile" / "summary.json").read_text())
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        print(f"graph breaks: {sum(breaks.values())} {breaks}", file=sys.stderr)
    del trainer
    return result


def run_hf(name: str, steps: int, *, attn_implementation: str, compile: bool) -> dict:
    model = hf_model(attn_implementation=attn_implementation)
    hf_cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    params = list(model.parameters())
    torch.cuda.reset_peak_memory_stats()
    records = hf_train(torch.compile(model) if compile else model, params, steps, lr=3e-4, weight_decay=0.1)
    attention_per_pair = 12 * hf_cfg.head_dim * hf_cfg.num_attention_heads * hf_cfg.num_hidden_layers
    for r in records:
        r["mfu"] = (6 * n_params * r["tokens"] + attention_per_pair * r["pairs"]) / (r["step_ms"] / 1000) / PEAK_FLOPS
    result = {"config": name, **medians(records, WARMUP, ("tokens_per_s", "mfu", "step_ms"))}
    return result | {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "params": n_params}


def run_titan(name: str, steps: int, *, preset: str = "llama-3.2-1b") -> dict:
    """torchtitan's model and ``train_step`` with the hyper-parameters of nemo_lite's benchmark recipe."""
    import torchtitan_peer as peer

    optim = gpu_recipe(f"/tmp/bench_train/{name}", steps).optim
    started = peer.single_process_group("cuda")
    try:
        trainer = peer.build_trainer(
            preset, steps=steps, seq_len=SEQ_LEN, rows=ROWS, eos_id=EOS, lr=optim.lr,
            warmup_steps=optim.warmup_steps, min_lr_ratio=optim.min_lr_ratio, weight_decay=optim.weight_decay,
            clip=1.0,
        )  # fmt: skip
        params = sum(p.numel() for p in trainer.model_parts[0].parameters())
        torch.cuda.reset_peak_memory_stats()
        records = peer.titan_train(trainer, synthetic_loader(), steps, PEAK_FLOPS)
        keys = ("tokens_per_s", "mfu", "mfu_torchtitan_definition", "step_ms")
        result = {"config": name, **medians(records, WARMUP, keys), "torchtitan": peer.version()}
        del trainer
        return result | {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "params": params, "tied": False}
    finally:
        if started:
            torch.distributed.destroy_process_group()


CONFIGS = {
    # name: (runner, keyword arguments: recipe keys for nemo_lite, the model's settings for transformers)
    "flex-compile": (run_nemo, {}),
    "flex-compile-plain": (run_nemo, {"trainer.step_impl": "plain"}),
    # torchtitan 0.2.x's llama3 has a separate output projection: the same shape untied
    "flex-compile-untied": (run_nemo, {"model.overrides": {"tie_word_embeddings": False}}),
    "flex-compile-chunk": (run_nemo, {"trainer.loss_chunk_size": 2048}),
    "flex-compile-torchflex": (run_nemo, {"attention.options": {"kernel_options": "torch"}}),
    "flex": (run_nemo, {"trainer.compile": False}),
    "varlen-compile": (run_nemo, {"attention.backend": "varlen"}),
    "varlen-nosync-compile": (run_nemo, {"attention.backend": "varlen", "attention.options": {"host_sync": False}}),
    "sdpa-compile": (run_nemo, {"attention.backend": "sdpa"}),
    "sdpa": (run_nemo, {"attention.backend": "sdpa", "trainer.compile": False}),
    "hf-sdpa": (run_hf, {"attn_implementation": "sdpa", "compile": False}),
    "hf-flex": (run_hf, {"attn_implementation": "flex_attention", "compile": False}),
    "hf-flex-compile": (run_hf, {"attn_implementation": "flex_attention", "compile": True}),
    "torchtitan-compile": (run_titan, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--configs", default="hf-sdpa,hf-flex,flex,flex-compile,flex-compile-chunk,varlen-compile")
    parser.add_argument("--out", default=None)
    parser.add_argument("--profile", default="", help="comma-separated nemo_lite configs to profile (steps 7-9)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # several models and kernel options in one process
    for name in filter(None, args.profile.split(",")):
        if CONFIGS.get(name, (None,))[0] is not run_nemo:
            sys.exit(f"--profile {name!r}: only nemo_lite configs are profiled; choose from {', '.join(CONFIGS)}")
        CONFIGS[name][1]["profile"] = True
    runs = {
        name: (lambda run=run, kw=kw, name=name: run(name, args.steps, **kw)) for name, (run, kw) in CONFIGS.items()
    }

    def write(rows: list[dict]) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": meta(), "rows": rows}, indent=1))

    results = run_all(args.configs.split(","), runs, write)
    base = next((r["tokens_per_s"] for r in results if r["config"] == "hf-sdpa" and "error" not in r), None)
    print(f"\n{meta()}\n")
    print("| config | tokens/s | vs hf-sdpa | MFU | peak GiB | mask ms (share) | recompiles after step 2 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['config']} | {r['error']} | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        label = r["config"]
        if "torchtitan" in r:  # which version ran, and its own MFU (attention counted over the full square)
            label += f" ({r['torchtitan']}; its MFU {100 * r['mfu_torchtitan_definition']:.1f}%)"
        mask = f"{r['mask_ms']:.2f} ({100 * r['mask_share']:.2f}%)" if "mask_ms" in r else "-"
        print(
            f"| {label} | {r['tokens_per_s']:.0f} | {ratio} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_mem_gib']:.1f} | {mask} | {r.get('recompiles_after_step_2', '-')} |"
        )


if __name__ == "__main__":
    main()
