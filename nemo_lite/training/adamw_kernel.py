"""AdamW over all parameter tensors in one Triton launch (needs triton, which CUDA builds of torch ship).

torch's fused AdamW takes 15.3 ms for the Llama-3.2-1B update on an H100 (1.24B float32 parameters,
~40 GB moved: 2.6 TB/s of the card's 3.35). This kernel takes 12.0 ms (2.9 TB/s, 35 GB: it does not
write the unscaled gradient back). Each program updates one block of one tensor; a table built once
per set of sizes says which, and the tensors' addresses travel in a small int64 tensor each step, so
the update costs one launch instead of one per tensor (146 for the 1B model; launched one by one
from Python the host could not keep up). ``scripts/bench_optimizer.py``, docs/benchmarks.md.

The arithmetic follows torch's fused AdamW line by line (decoupled weight decay, bias corrections
from the step count, ``sqrt(v) / sqrt(1 - beta2^t) + eps``), in float32, with the gradients divided
by ``grad_scale`` first when one is given (the in-kernel clip): results agree with torch's kernel to
float32 rounding, not bit for bit (``pow`` and the order of the multiplications differ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # scripts/bench_optimizer.py: 512-1024 elements were fastest on an H100 and an H200, 2048 slower
NUM_WARPS = 8
ALIGN = 16  # bytes: the kernel tells Triton (literal 16 below) that every tensor is aligned, for vector loads


@triton.jit
def _adamw_kernel(
    pointers_ptr,  # int64 [5, n_tensors]: param, grad, exp_avg, exp_avg_sq, step addresses
    block_tensor_ptr,  # int32 [n_blocks]: the tensor each program updates
    block_start_ptr,  # int64 [n_blocks]: the program's first element in that tensor
    numel_ptr,  # int64 [n_tensors]
    scale_ptr,
    found_inf_ptr,  # 1.0: leave everything as it is (a non-finite step)
    n_tensors,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tensor = tl.load(block_tensor_ptr + tl.program_id(0))
    offsets = tl.load(block_start_ptr + tl.program_id(0)) + tl.arange(0, BLOCK)
    limit = tl.load(numel_ptr + tensor)
    if HAS_FOUND_INF:  # a skipped step touches no element
        limit = tl.where(tl.load(found_inf_ptr) == 1.0, 0, limit)
    mask = offsets < limit
    f32 = tl.pointer_type(tl.float32)
    param_ptr = tl.multiple_of(tl.load(pointers_ptr + tensor).to(f32, bitcast=True), 16)
    grad_ptr = tl.multiple_of(tl.load(pointers_ptr + n_tensors + tensor).to(f32, bitcast=True), 16)
    exp_avg_ptr = tl.multiple_of(tl.load(pointers_ptr + 2 * n_tensors + tensor).to(f32, bitcast=True), 16)
    exp_avg_sq_ptr = tl.multiple_of(tl.load(pointers_ptr + 3 * n_tensors + tensor).to(f32, bitcast=True), 16)
    step_ptr = tl.load(pointers_ptr + 4 * n_tensors + tensor).to(f32, bitcast=True)

    grad = tl.load(grad_ptr + offsets, mask=mask)
    if HAS_SCALE:
        grad = grad / tl.load(scale_ptr)
    param = tl.load(param_ptr + offsets, mask=mask)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
    step = tl.load(step_ptr)
    param = param - lr * weight_decay * param
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    bias_correction1 = 1 - tl.exp2(step * tl.log2(beta1))
    bias_correction2_sqrt = tl.sqrt(1 - tl.exp2(step * tl.log2(beta2)))
    denom = tl.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - (lr / bias_correction1) * exp_avg / denom
    tl.store(param_ptr + offsets, param, mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)


class BlockTable:
    """Which tensor and which elements each program of the one launch updates, for fixed sizes."""

    def __init__(self, numels: list[int], device: torch.device) -> None:
        self.numels = list(numels)
        blocks = torch.tensor([triton.cdiv(n, BLOCK) for n in numels])
        self.block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks).to(device)
        starts = [torch.arange(int(b), dtype=torch.int64) * BLOCK for b in blocks]
        self.block_start = torch.cat(starts).to(device)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=device)
        self.block = BLOCK


def check_tensors(tensor_lists: list[list[torch.Tensor]]) -> None:
    """The kernel reads raw addresses: contiguous float32 tensors, aligned, a gradient per parameter."""
    for i, param in enumerate(tensor_lists[0]):
        for tensor in (t[i] for t in tensor_lists):
            if tensor.dtype != torch.float32 or not tensor.is_contiguous() or tensor.data_ptr() % ALIGN:
                raise ValueError(
                    f"the triton AdamW kernel needs contiguous, {ALIGN}-byte aligned float32 tensors; got a "
                    f"{tensor.dtype} tensor of shape {tuple(tensor.shape)} for a parameter of shape "
                    f"{tuple(param.shape)}: use optim.kernel=torch"
                )
            if tensor.numel() != param.numel():
                raise ValueError(
                    f"a gradient or state of shape {tuple(tensor.shape)} for a {tuple(param.shape)} parameter"
                )


def adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    table: BlockTable | None = None,
) -> BlockTable:
    """One AdamW step in place, all tensors in one launch; ``steps`` (float32 scalars on the same
    device) are incremented first, as torch's optimizer does. With ``found_inf`` (a float32 scalar on
    the device) equal to 1 nothing changes, steps included, as in torch's fused AdamW. Returns the
    block table, which the caller passes back on later steps (it depends only on the sizes)."""
    if not params:
        return table
    tensor_lists = [params, grads, exp_avgs, exp_avg_sqs]
    device = params[0].device
    numels = [p.numel() for p in params]
    if table is None or table.numels != numels or table.block != BLOCK:
        check_tensors(tensor_lists)
        table = BlockTable(numels, device)
    addresses = [[t.data_ptr() for t in ts] for ts in (*tensor_lists, steps)]
    # Parameters and state were checked with the table; the gradients are new every step (kept cheap: this
    # runs while the GPU waits for the update).
    grads_ok = all(g.dtype == torch.float32 and g.is_contiguous() for g in grads)
    if not grads_ok or [g.numel() for g in grads] != numels or any(a % ALIGN for row in addresses[:4] for a in row):
        check_tensors(tensor_lists)  # names the offending tensor
    torch._foreach_add_(steps, 1)
    # Non-blocking: a blocking copy would make the host wait for the stream. From pageable memory the
    # driver stages the bytes before it returns, so the CPU tensor may go away at once.
    pointers = torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=True)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    scale = grad_scale if grad_scale is not None else steps[0]  # any valid pointer when unused
    _adamw_kernel[(table.block_tensor.numel(),)](
        pointers,
        table.block_tensor,
        table.block_start,
        table.numel,
        scale,
        found_inf if found_inf is not None else steps[0],
        len(params),
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        HAS_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return table
