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
import sys
from pathlib import Path

import torch
import torch._dynamo
from bench_utils import PEAK_FLOPS, gpu_recipe, hf_train, median_after_warmup, medians, meta, run_all, train

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


class GraphCount:
    """The graphs compiled after the second step: an ``on_step`` callback of the loops, then :meth:`after_2`."""

    def __init__(self) -> None:
        self.at_2: int | None = None

    def __call__(self, step) -> None:
        if getattr(step, "step", step) == 2:  # the trainer (nemo_lite) or the step number (transformers)
            self.at_2 = graphs()

    def after_2(self) -> int | None:
        return None if self.at_2 is None else graphs() - self.at_2


def summary(records: list[dict], mfu: list[float] | None, count: GraphCount) -> dict:
    """Medians after warm-up, first and last loss, MFU (GPU only), peak memory and recompilations."""
    out = medians(records, WARMUP if len(records) > WARMUP else 0)
    out["mfu"] = median_after_warmup(mfu, WARMUP) if mfu and torch.cuda.is_available() else None
    out["recompiles_after_step_2"] = count.after_2()
    if torch.cuda.is_available():
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_nemo(size: str, steps: int, *, compile: bool, impl: str = "auto") -> dict:
    from nemo_lite.components.models.moe import experts_implementation

    cuda = torch.cuda.is_available()
    rows, seq_len = ROWS[size]
    cfg = gpu_recipe(
        f"/tmp/bench_moe/nemo-{compile}-{impl}",
        steps,
        preset="qwen3-30b-a3b",
        **{
            "model.vocab_from_tokenizer": False,
            "model.overrides": {**SHAPES[size], "eos_token_id": EOS},
            "attention.backend": "flex" if cuda else "sdpa",
            "data.batch_size": rows,
            "data.seq_len": seq_len,
            "trainer.compile": compile and cuda,
        },
    )
    count = GraphCount()
    run = train(cfg, loader(size), on_step=count, before_fit=lambda tr: experts_implementation(tr.raw_model, impl))
    records = run.records
    return {
        **summary(records, [r["mfu"] for r in records] if records[0]["mfu"] is not None else None, count),
        "expert_load_imbalance": records[-1]["expert_load_imbalance"],
        "step": run.trainer.step_impl.description,
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
    active = num_parameters(config, active=True) - config.vocab_size * config.hidden_size  # not the lookup
    per_pair = 12 * config.head_dim * config.num_attention_heads * config.num_hidden_layers
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    count = GraphCount()
    params = list(model.parameters())
    records = hf_train(
        torch.compile(model) if compile else model, params, steps, lr=3e-4, weight_decay=0.1, loader=loader(size),
        on_step=count,
    )  # fmt: skip
    mfu = [(6 * active * r["tokens"] + per_pair * r["pairs"]) / (r["step_ms"] / 1000) / PEAK_FLOPS for r in records]
    return summary(records, mfu, count)


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
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    count = GraphCount()
    records = hf_train(
        model, params, steps, lr=1e-4, weight_decay=0.0, loader=lora_loader(size), forward=forward, on_step=count
    )
    mfu = [flops_per_token * r["tokens"] / (r["step_ms"] / 1000) / PEAK_FLOPS for r in records]
    return {**summary(records, mfu, count), "trainable": sum(p.numel() for p in params)}


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


def moe_meta(size: str) -> dict:
    from nemo_lite.components.models.moe import num_parameters

    config = moe_config(size)
    return meta() | {
        "shape": SHAPES[size],
        "rows_x_seq": ROWS[size],
        "parameters": num_parameters(config),
        "active_parameters": num_parameters(config, active=True),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SHAPES), default="gpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--configs", default="hf-grouped_mm,hf-grouped_mm-compile,flex,flex-compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.size == "gpu" and not torch.cuda.is_available():
        sys.exit("--size gpu needs a CUDA GPU; --size toy runs on the CPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # several models in one process
    info = moe_meta(args.size)
    runs = {
        name: (lambda run=run, kw=kw, name=name: {"config": name, **run(args.size, args.steps, **kw)})
        for name, (run, kw) in CONFIGS.items()
    }

    def write(rows: list[dict]) -> None:
        if args.out:
            Path(args.out).write_text(json.dumps({"meta": info, "rows": rows}, indent=1, default=str))

    rows = run_all(args.configs.split(","), runs, write)

    def baseline(name: str) -> float | None:  # the best transformers row of the same workload
        same = [r for r in rows if r["config"].startswith("hf-") and ("gpt-oss" in r["config"]) == ("gpt-oss" in name)]
        return max((r["tokens_per_s"] for r in same if "error" not in r), default=None)

    print(f"\n{json.dumps(info)}\n")
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
    return rows


if __name__ == "__main__":
    main()
