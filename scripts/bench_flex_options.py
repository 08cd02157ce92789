"""Flex attention kernel options at the training workload's attention shape, through nemo_lite's own
FlexAttention (bf16, one GPU): torch's default Triton configuration for the card and nemo_lite's tuned
options (``kernel_options="auto"``) against candidate block sizes, warps and stages, forward and
forward+backward.

    python scripts/bench_flex_options.py [--iters 20] [--rounds 3] [--out results.json] [--best best.json]

Shape: 2 x 4096 tokens, 32 query / 8 KV heads, head_dim 64 (Llama-3.2-1B), block_causal over EOS-delimited
documents with log-normal lengths (mean 600, sigma 1). Each candidate is its own
``FlexAttention(kernel_options=...)`` and compiles flex_attention again; the candidates are timed in turn,
``--rounds`` times, so clock drift hits them all alike. ``--best`` writes the fastest fwd+bwd kernel options
(an entry for ``TUNED_KERNEL_OPTIONS`` in ``nemo_lite/components/attention/flex_attention.py``), or {} when
it beats torch's defaults by less than the spread of the default's rounds (or 2%).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch._dynamo
from bench_attention import EOS, packed_ids
from bench_utils import cuda_time_ms, meta

from nemo_lite.components.attention.flex_attention import FlexAttention, tuned_kernel_options


def fwd(block_m: int, block_n: int, warps: int, stages: int) -> dict:
    return {"fwd_BLOCK_M": block_m, "fwd_BLOCK_N": block_n, "fwd_num_warps": warps, "fwd_num_stages": stages}


def bwd(block_m1: int, block_n1: int, warps: int, stages: int) -> dict:
    """Backward: M1 x N1 tiles for dK/dV, N1 x M1 (M2 = N1, N2 = M1) for dQ, as torch pairs them."""
    return {
        "bwd_BLOCK_M1": block_m1,
        "bwd_BLOCK_N1": block_n1,
        "bwd_BLOCK_M2": block_n1,
        "bwd_BLOCK_N2": block_m1,
        "bwd_num_warps": warps,
        "bwd_num_stages": stages,
    }


# BlockMask tiles other than torch's 128 (64, or 128 x 64 with matching kernel tiles) do not compile in
# torch 2.11 (inductor: "NoValidChoicesError"), so only the kernel's own tiles are varied here.
# Each candidate is FlexAttention's ``kernel_options``: "torch" (torch's defaults for the card), "auto"
# (nemo_lite's measured options for the card and head_dim, torch's defaults where it has none) or a dict.
CANDIDATES: dict[str, str | dict] = {
    "default": "torch",
    "nemo_lite auto": "auto",
    "fwd 64x64": fwd(64, 64, 4, 3),
    "fwd 128x64 w8 s2": fwd(128, 64, 8, 2),
    "bwd 64/64": bwd(64, 64, 4, 3),
    "bwd 32/128": bwd(32, 128, 4, 3),
    "fwd 64x64 + bwd 64/64": {**fwd(64, 64, 4, 3), **bwd(64, 64, 4, 3)},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="candidates are timed in turn, this many times")
    parser.add_argument("--out", default=None)
    parser.add_argument("--best", default=None, help="write the best options (JSON) here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_flex_options.py needs a CUDA GPU")
    torch._dynamo.config.cache_size_limit = 256  # one compiled flex_attention per candidate
    torch._dynamo.config.accumulated_cache_size_limit = 4096

    batch, seq_len, h_q, h_kv, head_dim = 2, 4096, 32, 8, 64
    ids = packed_ids(batch, seq_len, 600).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(batch, h, seq_len, head_dim) for h in (h_q, h_kv, h_kv)]
    q, k, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=g) for s in shapes)
    grad = torch.randn_like(q)
    attentions = {
        name: FlexAttention(attn_mask_type="block_causal", kernel_options=options)
        for name, options in CANDIDATES.items()
    }
    mask = attentions["default"].build_mask(ids, EOS)
    with torch.no_grad():  # float32 reference with torch's defaults
        ref = attentions["default"](q.float(), k.float(), v.float(), enable_gqa=True, attention_mask=mask)
    times: dict[str, dict[str, list[float]]] = {name: {"fwd": [], "fwd_bwd": []} for name in CANDIDATES}
    errors: dict[str, str] = {}
    max_err: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, attention in attentions.items():
            if name in errors:
                continue
            kw = {"enable_gqa": True, "attention_mask": mask}
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def forward(attention=attention, kw=kw):
                return attention(q, k, v, **kw)

            def fwd_bwd(attention=attention, leaves=leaves, kw=kw):
                attention(*leaves, **kw).backward(grad)

            try:
                with torch.no_grad():
                    times[name]["fwd"].append(cuda_time_ms(forward, args.iters))
                    max_err[name] = float((forward().float() - ref).abs().max())
                times[name]["fwd_bwd"].append(cuda_time_ms(fwd_bwd, args.iters))
            except Exception as err:  # an invalid combination for this card: record it and go on
                errors[name] = f"{type(err).__name__}: {str(err)[:200]}"
    rows = []
    for name, options in CANDIDATES.items():
        row = {"candidate": name, "options": options}
        if name in errors:
            row["error"] = errors[name]
        else:
            row.update(
                fwd_ms=statistics.median(times[name]["fwd"]),
                fwd_bwd_ms=statistics.median(times[name]["fwd_bwd"]),
                fwd_bwd_ms_rounds=times[name]["fwd_bwd"],
                max_abs_err_vs_fp32=max_err[name],
            )
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    ok = [r for r in rows if "error" not in r]
    default = next(r for r in ok if r["candidate"] == "default")
    spread = max(default["fwd_bwd_ms_rounds"]) - min(default["fwd_bwd_ms_rounds"])
    winner = min(ok, key=lambda r: r["fwd_bwd_ms"])
    better = default["fwd_bwd_ms"] - winner["fwd_bwd_ms"] > max(spread, 0.02 * default["fwd_bwd_ms"])
    chosen = winner["options"] if better else {}
    if isinstance(chosen, str):  # "auto" won: the options it stands for on this card
        chosen = tuned_kernel_options("cuda", head_dim) or {}
    where = {
        **meta(),
        "shape": f"{batch}x{seq_len}, {h_q}/{h_kv} heads, d{head_dim}, log-normal docs mean 600",
        "default_spread_ms": spread,
        "chosen": chosen,
    }
    print(f"\n{where}\n")
    print("| candidate | fwd ms | fwd+bwd ms (median of rounds) | rounds | max abs err vs fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['candidate']} | {r['error']} | | | |")
        else:
            rounds = " / ".join(f"{t:.3f}" for t in r["fwd_bwd_ms_rounds"])
            print(
                f"| {r['candidate']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | {rounds} | "
                f"{r['max_abs_err_vs_fp32']:.2e} |"
            )
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": where, "rows": rows}, indent=1))
    if args.best:
        Path(args.best).write_text(json.dumps(chosen))


if __name__ == "__main__":
    main()
