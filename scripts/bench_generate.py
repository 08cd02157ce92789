"""Decode speed: nemo_lite's KV-cache generation against transformers' ``generate`` with its static cache and
``torch.compile``, and nemo_lite's batch-1 decode as a fraction of the memory-bandwidth limit.

    python scripts/bench_generate.py --out results.json                 # GPU: Llama-3.2-1B shape, bf16
    python scripts/bench_generate.py --tiny --out /tmp/tiny.json        # CPU check at a toy size

Workload: a Llama-3.2-1B-shaped model with random weights (seed 0), bf16, sdpa attention; ``--batch-sizes``
rows (default 1 and 32) of ``--prompt-len`` random token ids, each continued greedily by exactly
``--new-tokens`` tokens (no EOS stops a row). nemo_lite runs its decode step compiled and replayed as a CUDA graph
(``GenerationConfig(compile=True, cuda_graphs=True)``); transformers runs ``generate(cache_implementation="static")``
with a ``CompileConfig(fullgraph=True, mode="reduce-overhead")`` (its documented fast path).

Decode tokens/s (new tokens of every row, per second) is measured the same way for both, after a warm-up run:
``(time to generate N tokens - time to generate 2 tokens) / (N - 2)`` per step, medians of ``--repeats`` runs, so
prefill, the first decode step and the set-up of a run (the cache, the CUDA graph's capture) are left out.

The bandwidth limit at batch 1: every decode step reads every weight once and the live part of the KV cache (the
mean context over the run, ``prompt + N / 2`` tokens, all layers, keys and values); the limit is the card's
bandwidth over those bytes (H100 3.35 TB/s, H200 4.8 TB/s, from the device name; ``--bandwidth`` overrides), and
the fraction reported is measured tokens/s over that limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_lite.components.attention import AttentionConfig  # noqa: E402
from nemo_lite.components.models import LlamaForCausalLM, get_preset  # noqa: E402
from nemo_lite.components.models.generate import GenerationConfig, generate_ids, kv_cache_bytes  # noqa: E402
from nemo_lite.components.models.hf import config_to_hf  # noqa: E402

BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}  # bytes/s, HBM3e and HBM3 (SXM)


def card_bandwidth(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in BANDWIDTH.items() if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def decode_rate(run, batch: int, new_tokens: int, repeats: int, device: torch.device) -> dict:
    """Tokens/s of decode alone: runs of N and of 2 new tokens, the difference over N - 2 steps."""
    run(new_tokens)  # warm-up: compiles (both cache lengths), captures, fills the allocator
    run(2)
    full = [timed(lambda: run(new_tokens), device) for _ in range(repeats)]
    first = [timed(lambda: run(2), device) for _ in range(repeats)]
    step_s = (statistics.median(full) - statistics.median(first)) / (new_tokens - 2)
    return {"tokens_per_s": batch / step_s, "step_ms": step_s * 1e3, "total_s": statistics.median(full)}


def bench_nemo(model, prompts, new_tokens: int, repeats: int, device: torch.device, fast: bool) -> dict:
    def run(n: int):
        config = GenerationConfig(max_new_tokens=n, compile=fast, cuda_graphs=fast)
        out = generate_ids(model, prompts, config)
        assert all(len(t) == n for t in out.tokens)

    return decode_rate(run, len(prompts), new_tokens, repeats, device)


def bench_hf(model, prompts, new_tokens: int, repeats: int, device: torch.device, fast: bool) -> dict:
    from transformers import CompileConfig

    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, cache_implementation="static")
    if fast:
        kwargs["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")

    def run(n: int):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kwargs)
        assert out.shape[1] == ids.shape[1] + n

    return decode_rate(run, len(prompts), new_tokens, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy size on the CPU, float32, to check the script")
    parser.add_argument("--preset", default=None, help="model preset (default llama-3.2-1b; tiny with --tiny)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bandwidth", type=float, default=None, help="bytes/s of the card (default: from its name)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--out", required=True, help="results JSON")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    fast = device.type == "cuda"
    preset = args.preset or ("tiny" if args.tiny else "llama-3.2-1b")
    batch_sizes = args.batch_sizes or ([1, 4] if args.tiny else [1, 32])
    prompt_len = args.prompt_len or (16 if args.tiny else 128)
    new_tokens = args.new_tokens or (16 if args.tiny else 256)

    config = get_preset(preset)
    torch.manual_seed(0)
    with torch.device(device):  # built and initialized on the card: no float32 copy on the host
        model = LlamaForCausalLM(config, attention=AttentionConfig(backend="sdpa", attn_mask_type="causal"))
    model.init_weights(seed=0)
    model = model.to(dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    hf = None
    if not args.skip_hf:
        import transformers

        hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "model_type"})
        with torch.device(device):
            hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
        hf = hf.to(device).eval()

    gen = torch.Generator().manual_seed(0)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "preset": preset,
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "weight_bytes": weight_bytes,
        "runs": [],
    }
    bandwidth = card_bandwidth(device, args.bandwidth)
    for batch in batch_sizes:
        prompts = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=gen).tolist()
        with torch.no_grad():
            row = {"batch_size": batch, "nemo_lite": bench_nemo(model, prompts, new_tokens, args.repeats, device, fast)}
            if hf is not None:
                row["transformers"] = bench_hf(hf, prompts, new_tokens, args.repeats, device, fast)
                row["speedup"] = row["nemo_lite"]["tokens_per_s"] / row["transformers"]["tokens_per_s"]
        live_cache = kv_cache_bytes(config, batch, prompt_len + new_tokens // 2, dtype)
        row["bytes_per_step"] = weight_bytes + live_cache
        if bandwidth:
            limit = bandwidth / row["bytes_per_step"] * batch
            row["bandwidth_limit_tokens_per_s"] = limit
            row["fraction_of_bandwidth_limit"] = row["nemo_lite"]["tokens_per_s"] / limit
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
