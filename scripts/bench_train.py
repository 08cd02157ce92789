"""End-to-end training throughput on one GPU: nemo_lite's Trainer next to Hugging Face transformers,
same model shape, same packed batches, same optimizer, in the same process on the same card.

    python scripts/bench_train.py [--steps 50] [--configs flex-compile,flex,sdpa,hf-sdpa,hf-flex] [--out r.json]

Workload (issue "one-GPU performance"): Llama-3.2-1B shape, random init, 2 x 4096 tokens per step of
EOS-delimited documents with fixed-seed log-normal lengths (mean ~600; every step a new layout),
bf16 autocast over float32 master weights, AdamW (fused: nemo_lite's Triton kernel unless the config
says torch's; transformers always runs torch's). Reported per config: median tokens/s over
the steps after warm-up, MFU (6 x params x tokens + the attention FLOPs of the actual document mask,
against 989 TFLOP/s bf16 dense), peak memory, mask-build share of the step, and the number of
graphs compiled after the second step (recompilations).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch._dynamo

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
    chunk: int,
    ac: bool,
    profile: bool = False,
    host_sync: bool = True,
    device_step: bool = True,
    tuned: bool = False,
    adam_kernel: str = "auto",
    weight_copies: str = "auto",
    lookup_gradient: str = "auto",
    loss_kernel: str = "auto",
    flex_options: str = "auto",
    time_update_alone: bool = False,
    time_update_in_loop: bool = False,
) -> dict:
    import torch._dynamo

    from nemo_lite.components.attention.flex_attention import FlexAttention
    from nemo_lite.training.config import RecipeConfig
    from nemo_lite.training.trainer import Trainer

    cfg = RecipeConfig()
    cfg.run_dir = f"/tmp/bench_train/{name}"
    cfg.model.preset = "llama-3.2-1b"
    cfg.model.vocab_from_tokenizer = False
    cfg.attention.backend = backend
    cfg.data.seq_len, cfg.data.batch_size = 4096, 2
    t = cfg.trainer
    t.max_steps, t.compile, t.loss_chunk_size, t.activation_checkpointing = steps, compile, chunk, ac
    t.val_every = t.save_every = 0
    t.export_hf, t.sample_tokens, t.progress_bar = False, 0, False
    cfg.optim.warmup_steps = 5
    cfg.optim.kernel = adam_kernel
    cfg.optim.weight_copies = weight_copies
    cfg.optim.lookup_gradient = lookup_gradient
    t.loss_kernel = loss_kernel
    if profile:  # steps 7-9 (left out of the medians below); the trainer writes run_dir/profile/summary.json
        t.profile_start, t.profile_steps = 6, PROFILED_STEPS
    cfg.attention.flex_kernel_options = flex_options
    trainer = Trainer(cfg, train_loader=loader())
    trainer.setup()
    if tuned:  # --flex-kernel-options, over whatever the trainer set
        FlexAttention.kernel_options = FLEX_KERNEL_OPTIONS or None
    if not device_step:  # the clip pass + host check before a plain fused step (the trainer's unfused path)
        trainer._device_step = False
    if not host_sync:  # varlen's sync-free segments (a backend option the recipes do not expose)
        trainer.raw_model.attention_backend.host_sync = False
    torch.cuda.reset_peak_memory_stats()
    records = []
    graphs_after_2 = None

    def after_step(tr, metrics):
        nonlocal graphs_after_2
        records.append(metrics)
        if tr.step == 2:
            graphs_after_2 = torch._dynamo.utils.counters["stats"]["unique_graphs"]

    trainer.hooks["after_step"] = after_step
    launch_events = watch_update(trainer) if time_update_in_loop and trainer.optimizer.kernel == "triton" else None
    trainer.fit()
    update_timing = time_update(trainer) if time_update_alone and trainer.optimizer.kernel == "triton" else None
    kernel_summary = None
    if profile:
        kernel_summary = json.loads((Path(cfg.run_dir) / "profile" / "summary.json").read_text())
        print(json.dumps(kernel_summary, indent=1), file=sys.stderr)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        print(f"graph breaks: {sum(breaks.values())} {breaks}", file=sys.stderr)
    graphs_end = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    steady = records[6 + PROFILED_STEPS :] if profile else records[5:]
    result = {
        "config": name,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mask_ms": statistics.median(r["mask_ms"] for r in steady),
        "step_ms": statistics.median(r["step_ms"] for r in steady),
        "recompiles_after_step_2": (graphs_end - graphs_after_2) if graphs_after_2 is not None else None,
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "params": trainer.n_params,
        "adamw_kernel": trainer.optimizer.kernel,
        "weight_copies": trainer.weight_copies,
        "lookup_gradient": trainer.lookup_gradient,
        "loss_kernel": trainer.loss_kernel,
        "flex_kernel_options": FlexAttention.kernel_options,
    }
    result["mask_share"] = result["mask_ms"] / result["step_ms"]
    if kernel_summary is not None:
        result["profile"] = kernel_summary
    if update_timing is not None:
        result["update_alone"] = update_timing
    if launch_events is not None:
        result["update_in_loop"] = update_in_loop(launch_events, skip=5)
    FlexAttention.kernel_options = None
    del trainer
    return result


def watch_update(trainer) -> list:
    """CUDA events around each launch of the update and of the gradient norm during training (no sync)."""
    opt, events = trainer.optimizer, []

    def timed(fn, kind):
        def wrapper(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            events.append((trainer.step, kind, start, end))
            return out

        return wrapper

    opt._launch = timed(opt._launch, "update launch")
    opt.grad_norm = timed(opt.grad_norm, "gradient norm")
    return events


def update_in_loop(events: list, skip: int) -> dict:
    """Median per step (after ``skip`` steps) of the update's launches and of the gradient norm."""
    torch.cuda.synchronize()
    per_step: dict[tuple[int, str], float] = {}
    for step, kind, start, end in events:
        if step >= skip:
            per_step[step, kind] = per_step.get((step, kind), 0.0) + start.elapsed_time(end)
    kinds = sorted({kind for _, kind in per_step})
    return {kind: statistics.median(v for (_, k), v in per_step.items() if k == kind) for kind in kinds}


def time_update(trainer) -> dict:
    """After training: one more forward and backward, then the gradient norm, the whole update, and each
    of its launches timed alone (CUDA events, 10 repeats); then the update again with every gradient
    moved to a fresh allocation (is the time in the kernel or in where the gradients lie?)."""
    from bench_attention import cuda_time_ms

    opt = trainer.optimizer
    batch = trainer._to_device(next(trainer._train_iter))
    trainer._loss_sum(batch, trainer._build_mask(batch["input_ids"])).backward()
    out = {"grad_norm_ms": cuda_time_ms(opt.grad_norm, 10), "update_ms": cuda_time_ms(opt.step, 10)}
    for key, steps, prepared in opt._prepare():
        n = int(prepared.table.numel.sum())
        ms = cuda_time_ms(lambda k=key, s=steps, p=prepared: opt._launch(k, s, p), 10)
        out[f"launch {key}"] = {"params": n, "ms": ms}
    for p in trainer.raw_model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()
    for copy in getattr(opt, "_copies", {}).values():
        if copy.grad is not None:
            copy.grad = copy.grad.clone()
    out["update_ms_fresh_grads"] = cuda_time_ms(opt.step, 10)
    opt.zero_grad()
    print(json.dumps(out), file=sys.stderr)
    return out


PROFILED_STEPS = 3
FLEX_KERNEL_OPTIONS: dict = {}  # --flex-kernel-options: flex kernel options for the "-tuned" configs


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
    steady = records[5:]
    result = {
        "config": name,
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "mfu": statistics.median(r["mfu"] for r in steady),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "step_ms": statistics.median(r["step_ms"] for r in steady),
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
        "params": n_params,
    }
    del model, opt
    return result


CONFIGS = {
    # name: (kind, kwargs)
    "flex-compile-chunk": ("nemo", dict(backend="flex", compile=True, chunk=2048, ac=False)),
    "flex-compile": ("nemo", dict(backend="flex", compile=True, chunk=0, ac=False)),
    "flex-compile-torchadam": ("nemo", dict(backend="flex", compile=True, chunk=0, ac=False, adam_kernel="torch")),
    "flex-compile-nocopies": ("nemo", dict(backend="flex", compile=True, chunk=0, ac=False, weight_copies="false")),
    "flex-compile-denselookup": (
        "nemo",
        dict(backend="flex", compile=True, chunk=0, ac=False, lookup_gradient="dense"),
    ),
    "flex-compile-torchflex": ("nemo", dict(backend="flex", compile=True, chunk=0, ac=False, flex_options="torch")),
    "flex-compile-torchloss": ("nemo", dict(backend="flex", compile=True, chunk=0, ac=False, loss_kernel="torch")),
    "flex-compile-tuned": ("nemo", dict(backend="flex", compile=True, chunk=0, ac=False, tuned=True)),
    "flex-compile-hoststep": ("nemo", dict(backend="flex", compile=True, chunk=0, ac=False, device_step=False)),
    "flex": ("nemo", dict(backend="flex", compile=False, chunk=0, ac=False)),
    "varlen-compile": ("nemo", dict(backend="varlen", compile=True, chunk=0, ac=False)),
    "varlen-nosync-compile": ("nemo", dict(backend="varlen", compile=True, chunk=0, ac=False, host_sync=False)),
    "sdpa-compile": ("nemo", dict(backend="sdpa", compile=True, chunk=0, ac=False)),
    "sdpa": ("nemo", dict(backend="sdpa", compile=False, chunk=0, ac=False)),
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
    parser.add_argument("--time-update", action="store_true", help="after training, time the update alone")
    parser.add_argument("--time-update-in-loop", action="store_true", help="time the update's launches in training")
    parser.add_argument("--adamw-block", default=None, help="BLOCK,NUM_WARPS of the triton AdamW kernel")
    parser.add_argument(
        "--inductor-config", default="", help="comma-separated torch._inductor.config settings, e.g. max_autotune=True"
    )
    parser.add_argument("--flex-kernel-options", default=None, help="JSON file of flex kernel options (-tuned configs)")
    args = parser.parse_args()
    if args.flex_kernel_options:
        FLEX_KERNEL_OPTIONS.update(json.loads(Path(args.flex_kernel_options).read_text()))
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
    if args.adamw_block:
        from nemo_lite.training import adamw_kernel

        adamw_kernel.BLOCK, adamw_kernel.NUM_WARPS = map(int, args.adamw_block.split(","))
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
                row = run_nemo(
                    name,
                    args.steps,
                    profile=profile,
                    time_update_alone=args.time_update,
                    time_update_in_loop=args.time_update_in_loop,
                    **kwargs,
                )
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


def meta() -> dict:
    import transformers

    return {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
    }


if __name__ == "__main__":
    main()
