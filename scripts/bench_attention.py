"""Attention fwd and fwd+bwd time per backend, through nemo_lite's own modules, next to torch's raw
compiled flex_attention, at the three shapes of the design's anchor table (bf16, one GPU).

    python scripts/bench_attention.py [--out results.json] [--iters 20] [--backends flex,sdpa,...]

Documents: fixed-seed log-normal lengths with the shape's mean, EOS-delimited, block_causal.
"sdpa-causal" ignores documents (is_causal, flash): a speed reference, not the same function.
Variants set a backend's own options (``attention.options`` in a recipe): "varlen-nosync" is varlen with
``host_sync=False``; "flex-torch" is flex with ``kernel_options="torch"`` (torch's tiles, as the raw kernel
runs; plain "flex" runs its default, ``"auto"``: nemo_lite's tuned tiles where measured for the card).
Mask build time is the backend's per-step build_mask (compiled create_block_mask for flex).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch
from bench_utils import cuda_time_ms, meta

from nemo_lite.components.attention import build_attention_backend

SHAPES = [
    # (batch, seq_len, q_heads, kv_heads, head_dim, mean document length)
    (1, 8192, 32, 8, 64, 585),
    (2, 4096, 32, 8, 128, 546),
    (1, 16384, 16, 8, 64, 2341),
]
EOS = 0
# --backends names that are not a registered backend's: (backend, attn_mask_type, the backend's options).
VARIANTS = {
    "sdpa-causal": ("sdpa", "causal", {}),
    "varlen-nosync": ("varlen", "block_causal", {"host_sync": False}),
    "flex-torch": ("flex", "block_causal", {"kernel_options": "torch"}),
}


def packed_ids(batch: int, seq_len: int, mean_doc: float, seed: int = 0) -> torch.Tensor:
    """Rows of EOS-delimited documents with log-normal lengths (sigma 1, given mean)."""
    g = torch.Generator().manual_seed(seed)
    sigma = 1.0
    mu = math.log(mean_doc) - sigma**2 / 2
    ids = torch.randint(1, 32000, (batch, seq_len), generator=g)
    for b in range(batch):
        pos = 0
        while True:
            length = max(1, int(torch.empty(1).log_normal_(mu, sigma, generator=g).item()))
            pos += length
            if pos > seq_len:
                break
            ids[b, pos - 1] = EOS
    return ids


def bench_shape(shape, backends: list[str], iters: int) -> list[dict]:
    batch, seq_len, h_q, h_kv, head_dim, mean_doc = shape
    ids = packed_ids(batch, seq_len, mean_doc).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, h_q, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, h_kv, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, h_kv, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    grad = torch.randn_like(q)
    rows = []

    def run(name, forward, build=None):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        row = {"shape": f"{batch}x{seq_len}, {h_q}/{h_kv}, d{head_dim}, doc {mean_doc}", "backend": name}
        try:
            with torch.no_grad():
                row["fwd_ms"] = cuda_time_ms(lambda: forward(q, k, v), iters)

            def fwd_bwd():
                out = forward(*leaves)
                out.backward(grad)

            row["fwd_bwd_ms"] = cuda_time_ms(fwd_bwd, iters)
            if build is not None:
                row["mask_ms"] = cuda_time_ms(build, iters)
        except torch.OutOfMemoryError:
            row["error"] = "OOM"
            torch.cuda.empty_cache()
        except Exception as err:  # record it and go on with the other backends
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)

    for name in backends:
        kind, mask_type, options = VARIANTS.get(name, (name, "block_causal", {}))
        backend = build_attention_backend(kind, attn_mask_type=mask_type, options=options)
        try:
            mask = backend.build_mask(ids, EOS)
        except Exception as err:
            rows.append({"shape": f"{batch}x{seq_len}", "backend": name, "error": f"{type(err).__name__}: {err}"})
            continue
        run(
            name,
            lambda a, b, c, backend=backend, mask=mask: backend(a, b, c, enable_gqa=True, attention_mask=mask),
            build=lambda backend=backend: backend.build_mask(ids, EOS),
        )
        del mask
        torch.cuda.empty_cache()

    # torch's own compiled flex_attention with a hand-built BlockMask: the kernel we wrap.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.cumsum((ids == EOS).int(), 1) - (ids == EOS).int()

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

    raw_flex = torch.compile(flex_attention, dynamic=False)
    build_raw = torch.compile(create_block_mask)
    block_mask = build_raw(mask_mod, batch, None, seq_len, seq_len, device="cuda")
    run(
        "torch flex (raw)",
        lambda a, b, c: raw_flex(a, b, c, block_mask=block_mask, enable_gqa=True),
        build=lambda: build_raw(mask_mod, batch, None, seq_len, seq_len, device="cuda"),
    )
    if "flex" in backends:  # nemo_lite's flex again, after the raw kernel: the spread of the timings
        backend = build_attention_backend("flex", attn_mask_type="block_causal")
        mask = backend.build_mask(ids, EOS)
        run("flex (again)", lambda a, b, c: backend(a, b, c, enable_gqa=True, attention_mask=mask))
    pairs = int((doc[:, :, None] == doc[:, None, :]).tril().sum())  # allowed (q, k) pairs
    for row in rows:
        if "fwd_ms" in row:  # 2 matmuls of 2*D flops per allowed pair and head
            row["fwd_tflops"] = 4 * head_dim * h_q * pairs / (row["fwd_ms"] * 1e-3) / 1e12
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--backends", default="flex,flex-torch,varlen,varlen-nosync,sdpa,sdpa-causal,eager")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU")
    backends = args.backends.split(",")
    # Every (shape, grad mode, wrapper) compiles flex_attention's one code object again; the default
    # limit of 8 entries would send the third shape to the unfused fallback (and out of memory).
    torch._dynamo.config.cache_size_limit = 64
    rows = []
    for shape in SHAPES:
        rows += bench_shape(shape, backends, args.iters)
    where = meta()
    print(f"\n{where}\n")
    print("| shape | backend | fwd ms | fwd+bwd ms | mask build ms | fwd TFLOP/s (mask's pairs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        keys = ("fwd_ms", "fwd_bwd_ms", "mask_ms", "fwd_tflops")
        cells = [f"{r[k]:.3f}" if k in r else r.get("error", "-") for k in keys]
        print(f"| {r['shape']} | {r['backend']} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": where, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
