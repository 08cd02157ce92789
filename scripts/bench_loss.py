"""The head loss alone at the training shape of Llama-3.2-1B (8,192 tokens, hidden 2048, 128,256 classes,
bf16 autocast over float32 weights): the compiled torch path (the plain step's) against nemo_lite's Triton
kernel (the fast step's, ``cross_entropy_sum(kernel="triton")``), forward + backward, and the kernel's row
pass alone, at the kernel's own block size and warps (``cross_entropy_kernel.BLOCK``, ``NUM_WARPS``). Last,
the two paths' loss and gradients are compared.

    python scripts/bench_loss.py [--iters 20] [--out r.json]

The row pass reads the 2.1 GB of bf16 logits once for the log-sum-exp, again (from L2 where they are
still there) for the gradient, and writes the gradient: 4.2 GB at the least, 6.3 GB if every second
read comes from memory. The GB/s column counts the least.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_utils import cuda_time_ms, meta

TOKENS, HIDDEN, VOCAB = 8192, 2048, 128256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_loss.py needs a CUDA GPU")
    from nemo_lite.training.fast import cross_entropy_kernel as kernel
    from nemo_lite.training.loss import cross_entropy_sum

    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1, TOKENS, HIDDEN, device="cuda", generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen)).requires_grad_()
    weight_bf16 = weight.detach().bfloat16().requires_grad_()  # as training runs it: a bf16 weight copy
    labels = torch.randint(0, VOCAB, (1, TOKENS), device="cuda", generator=gen)
    upstream = 1.0 / TOKENS
    scale = torch.full((), upstream, dtype=torch.float32, device="cuda")
    rows = []

    def step(**kwargs):
        hidden.grad = weight_bf16.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = cross_entropy_sum(hidden, weight_bf16, labels, **kwargs)
        (loss * upstream).backward()
        return loss

    for name, kwargs in [("torch, compiled", dict(compiled=True)), ("triton", dict(kernel="triton", grad_scale=scale))]:
        ms = cuda_time_ms(lambda kw=kwargs: step(**kw), iters=args.iters)
        rows.append({"what": f"projection + loss, fwd+bwd: {name}", "ms": ms})
        print(f"{rows[-1]['what']}: {ms:.3f} ms", flush=True)

    logits = hidden.detach().reshape(TOKENS, HIDDEN).bfloat16() @ weight_bf16.detach().t()
    flat = labels.reshape(-1)
    least_bytes = 2 * logits.numel() * logits.element_size()
    ms = cuda_time_ms(lambda: kernel.cross_entropy_rows_(logits, flat, scale), iters=args.iters)
    block, warps = kernel.BLOCK, kernel.NUM_WARPS
    rows.append({"what": "row pass", "block": block, "warps": warps, "ms": ms, "gb_per_s": least_bytes / ms / 1e6})
    print(f"row pass, block {block}, {warps} warps: {ms:.3f} ms ({rows[-1]['gb_per_s']:.0f} GB/s)", flush=True)

    results = {}
    for name, kwargs in [("torch", dict(compiled=True)), ("triton", dict(kernel="triton", grad_scale=scale))]:
        loss = step(**kwargs)
        results[name] = (loss.detach(), hidden.grad.clone(), weight_bf16.grad.float())
    agreement = {
        what: {"max_abs": (a - b).abs().max().item(), "max_ref": b.abs().max().item()}
        for what, a, b in zip(("loss", "grad hidden", "grad weight"), results["triton"], results["torch"], strict=True)
    }
    print(json.dumps(agreement, indent=1))
    where = {**meta(), "tokens": TOKENS, "hidden": HIDDEN, "vocab": VOCAB, "iters": args.iters}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": where, "rows": rows, "agreement": agreement}, f, indent=1)


if __name__ == "__main__":
    main()
