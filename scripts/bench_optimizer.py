"""The AdamW update alone on the Llama-3.2-1B parameters: torch's fused kernel against nemo_lite's
Triton kernel, time per step and the memory traffic it reaches.

    python scripts/bench_optimizer.py [--steps 20] [--out r.json]

Every parameter is float32 with a float32 gradient, ``exp_avg`` and ``exp_avg_sq``: the update reads
16 bytes and writes 12 per parameter (torch's kernel writes 16: the unscaled gradient goes back too).
The gradients are divided by a clip scale inside the kernel, as in training (``FusedAdamW.step(grad_scale=...)``
for torch's kernel, ``adamw_kernel.adamw_(grad_scale=...)`` for nemo_lite's; that the two agree is
tests/test_adamw_kernel.py's). Last, the Triton kernel as the fast step runs
it with bf16 weight copies: bf16 gradients and copies for the matrices, the tied embedding's two gradients
added. The kernel runs with its own block size and warps (``adamw_kernel.BLOCK``, ``NUM_WARPS``, recorded in
the output). The gradient norm over the same bf16 gradients is timed too.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from bench_utils import cuda_time_ms, meta, nemo_model

# Bytes moved per parameter: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq;
# torch's kernel also writes the unscaled gradient back when given a grad_scale.
BYTES_PER_PARAM = {"torch fused AdamW": 32, "triton": 28, "triton + bf16 copies": 28}
HYPER = dict(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def torch_adamw(params: list[torch.nn.Parameter], lr: float):
    """torch's fused AdamW (nemo_lite's FusedAdamW with kernel="torch"), one param group."""
    from nemo_lite.training.fast.optim import FusedAdamW

    return FusedAdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, kernel="torch")


def time_kernels(shapes: list[torch.Size], steps: int) -> list[dict]:
    from nemo_lite.training.fast import adamw_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 1e-3
    n = sum(p.numel() for p in params)
    scale = torch.tensor(1.7, device="cuda")

    torch_opt = torch_adamw(params, lr=1e-4)

    state = [(torch.zeros_like(p), torch.zeros_like(p), torch.zeros((), device="cuda")) for p in params]
    grads = [p.grad for p in params]

    table = None

    def triton_step():
        nonlocal table
        table = adamw_kernel.adamw_(
            [p.detach() for p in params],
            grads,
            [s[0] for s in state],
            [s[1] for s in state],
            [s[2] for s in state],
            grad_scale=scale,
            table=table,  # built on the first (warm-up) step, outside the timed steps
            **HYPER,
        )

    rows = [
        {"kernel": "torch fused AdamW", "ms": cuda_time_ms(lambda: torch_opt.step(grad_scale=scale), steps)},
        {"kernel": "triton", "ms": cuda_time_ms(triton_step, steps)},
    ]

    # With bf16 weight copies, as the fast step runs it: the decoder's matrices read a bf16 gradient and
    # write a bf16 copy (28 bytes per parameter, as without copies); the tied embedding adds its float32
    # lookup gradient and the head's bf16 one and writes a copy (32 bytes); the norm weights as above.
    # One launch for each of the three lists.
    embedding = [0]
    matrices = [i for i, p in enumerate(params) if p.dim() == 2 and i != 0]
    vectors = [i for i, p in enumerate(params) if p.dim() < 2]
    bf16_grads = {i: grads[i].to(torch.bfloat16) for i in embedding + matrices}
    copies = {i: params[i].detach().to(torch.bfloat16) for i in embedding + matrices}
    tables: dict = {}

    def copies_step():
        for key, index, f32, bf16 in (
            ("tied", embedding, True, True),
            ("copies", matrices, False, True),
            ("plain", vectors, True, False),
        ):
            tables[key] = adamw_kernel.adamw_(
                [params[i].detach() for i in index],
                [grads[i] for i in index] if f32 else None,
                [state[i][0] for i in index],
                [state[i][1] for i in index],
                [state[i][2] for i in index],
                grad_scale=scale,
                copies=[copies[i] for i in index] if bf16 else None,
                bf16_grads=[bf16_grads[i] for i in index] if bf16 else None,
                table=tables.get(key),
                **HYPER,
            )

    rows.append({"kernel": "triton + bf16 copies", "ms": cuda_time_ms(copies_step, steps)})
    n_embedding = params[0].numel()
    for row in rows:
        extra = 4 * n_embedding if row["kernel"] == "triton + bf16 copies" else 0  # the embedding's second gradient
        row["tb_per_s"] = (BYTES_PER_PARAM[row["kernel"]] * n + extra) / row["ms"] / 1e9

    return rows


def time_norms(shapes: list[torch.Size], steps: int) -> list[dict]:
    """The gradient norm's sum of squares over the matrices' bf16 gradients (as training reads them with
    copies), the median of three rounds."""
    from nemo_lite.training.fast import adamw_kernel

    gen = torch.Generator(device="cuda").manual_seed(0)
    grads = [(torch.randn(s, device="cuda", generator=gen) * 1e-3).bfloat16() for s in shapes]
    table = adamw_kernel.sum_of_squares(None, grads)[1]
    rounds = [cuda_time_ms(lambda: adamw_kernel.sum_of_squares(None, grads, table), steps) for _ in range(3)]
    ms = sorted(rounds)[1]
    value = adamw_kernel.sum_of_squares(None, grads, table)[0].item()
    n_bytes = 2 * sum(g.numel() for g in grads)
    return [{"kernel": "gradient norm", "ms_rounds": rounds, "value": value, "ms": ms, "tb_per_s": n_bytes / ms / 1e9}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_optimizer.py needs a CUDA GPU")
    shapes = [p.shape for p in nemo_model(device="meta").parameters()]
    rows = time_kernels(shapes, args.steps) + time_norms(shapes, args.steps)
    from nemo_lite.training.fast import adamw_kernel

    where = {
        **meta(),
        "params": sum(s.numel() for s in shapes),
        "triton_block": adamw_kernel.BLOCK,
        "triton_num_warps": adamw_kernel.NUM_WARPS,
    }
    print(json.dumps(where))
    print("| kernel | ms per step | TB/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['ms']:.3f} | {r['tb_per_s']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": where, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
