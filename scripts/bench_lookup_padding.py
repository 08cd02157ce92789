"""What holding back the pad token's lookups costs the fast step's embedding gradient: one lookup's backward and
its reduction to rows (``LookupGradient.rows``), without and with ``padding_idx`` (which adds one masked fill of
the lookup's output gradient), A/B in one process.

    python scripts/bench_lookup_padding.py [--vocab 128256 --hidden 2048 --tokens 8192] [--out r.json]

The default shape is Llama-3.2-1B's embedding and a 2 x 4096 micro-batch; about one token in ten is the pad id,
as ``<|im_end|>`` is in chat data. On a CPU (no CUDA) it runs at the size given, timed with perf_counter.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from bench_utils import cuda_time_ms, meta

from nemo_lite.training.fast.lookup_gradient import LookupGradient, lookup


def time_ms(fn, iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        return cuda_time_ms(fn, iters)
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=gen).to(device).requires_grad_()
    ids = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    pad = 2
    ids[::10] = pad
    ids = ids.to(device)
    # The lookup's output is float32 (autocast leaves embeddings alone), so its gradient arrives as float32.
    upstream = torch.randn(args.tokens, args.hidden, generator=gen).to(device)
    rows = []
    for name, padding_idx in (("every row", None), ("pad row held back", pad)):
        sink = LookupGradient(weight, padding_idx)

        def backward_and_rows(sink=sink):
            sink.clear()
            out = lookup(weight, ids, sink)
            out.backward(upstream)
            sink.rows()

        rows.append({"lookup": name, "ms": time_ms(backward_and_rows, args.iters, device)})
    where = {**meta(), "vocab": args.vocab, "hidden": args.hidden, "tokens": args.tokens, "device": str(device)}
    print(json.dumps(where), file=sys.stderr)
    print("| lookup gradient | ms (backward + rows) |\n|---|---|")
    for r in rows:
        print(f"| {r['lookup']} | {r['ms']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": where, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
