"""AdamW over all parameter tensors in one Triton launch (needs triton, which CUDA builds of torch ship).

The update is bound by memory traffic (a float32 parameter, its gradient and two moments read and
written), so this kernel moves as few bytes as it can: it does not write the unscaled gradient back
(``scripts/bench_optimizer.py`` times it). Each program updates one block of one tensor; a table built once
per set of sizes says which, and the tensors' addresses travel in a small int64 tensor each step, so
the update costs one launch instead of one per tensor (146 for the 1B model; launched one by one
from Python the host could not keep up).

The arithmetic follows torch's fused AdamW line by line (decoupled weight decay, bias corrections
from the step count, ``sqrt(v) / sqrt(1 - beta2^t) + eps``), in float32, with the gradients divided
by ``grad_scale`` first when one is given (the in-kernel clip): results agree with torch's kernel to
float32 rounding, not bit for bit (``pow`` and the order of the multiplications differ).

Gradients come as float32 (``grads``), as bf16 (``bf16_grads``: the gradient of a bf16 weight copy,
the same values autocast's float32 gradient has), or both, added in float32 (a tied embedding: its
lookup's float32 gradient and the output projection's bf16 one, as autograd would add them). The float32
gradient may also be a lookup's rows (``row_slots``, :mod:`nemo_lite.training.fast.lookup_gradient`): one row
per looked-up token, zero for the rest, read where the dense matrix would be. With
``copies`` the kernel also writes each updated parameter, rounded to bf16, into its copy. Reading a
bf16 gradient and writing a bf16 copy moves no more bytes than reading a float32 gradient, and saves
autocast's casts of weights and weight gradients, ~6 bytes per parameter per step.

With ``float8s`` the launch also produces each updated parameter's float8 (e4m3) copy and its tensorwise
scale, as torchao's dynamic cast of the float32 weight would (:mod:`nemo_lite.training.fast.float8_weights`):
the update already holds every element, so it folds each block's absolute maximum into the tensor's amax
(an atomic max on the bits), and a second launch over the same block table turns the amax into the scale
and writes the float8 bytes. A converted linear then reads its weight in float8 in forward and backward
instead of reducing and casting it twice per step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

BLOCK = 1024  # scripts/bench_optimizer.py: 512-1024 elements were fastest on an H100 and an H200, 2048 slower
NUM_WARPS = 8


# torch.finfo(torch.float8_e4m3fn).max, and torchao's floor under an amax (float8_utils.EPS).
E4M3_MAX = tl.constexpr(448.0)
AMAX_EPS = tl.constexpr(1e-12)
ALIGN = 16  # bytes: the kernel tells Triton (literal 16 below) that every tensor is aligned, for vector loads


@triton.jit
def _load_grad(
    pointers_ptr,
    n_tensors,
    tensor,
    start,
    offsets,
    mask,
    GRAD32: tl.constexpr,
    GRAD16: tl.constexpr,
    ROWS: tl.constexpr,
):
    """The float32 gradient (row 1 of the address table), the bf16 one (row 6) upcast, or their sum. With
    ROWS the float32 gradient is a lookup's rows (row 1: ``rows``, row 7: ``row_slot``, row 8: the row
    length): element ``(r, c)`` is ``rows[row_slot[r], c]``, or 0 where ``row_slot[r]`` is -1; the caller's
    ``mask`` keeps the block in its row (:func:`_row_limit`)."""
    bf16 = tl.pointer_type(tl.bfloat16)
    if GRAD32:
        address = tl.load(pointers_ptr + n_tensors + tensor)
        base = tl.multiple_of(address.to(tl.pointer_type(tl.float32), bitcast=True), 16)
        if ROWS:  # the program's block lies in one row (BlockTable with row_lens): one row_slot
            row_len = tl.load(pointers_ptr + 8 * n_tensors + tensor)
            slots = tl.load(pointers_ptr + 7 * n_tensors + tensor).to(tl.pointer_type(tl.int32), bitcast=True)
            row = start // row_len
            slot = tl.load(slots + row).to(tl.int64)
            source = base + (slot - row) * row_len  # element (row, c) of the parameter is rows[slot, c]
            looked_up = (offsets * 0 + slot) >= 0  # block-shaped: the interpreter wants a block mask
            grad = tl.load(source + offsets, mask=mask & looked_up, other=0.0)
        else:
            grad = tl.load(base + offsets, mask=mask)
        if GRAD16:
            address = tl.load(pointers_ptr + 6 * n_tensors + tensor)
            grad += tl.load(tl.multiple_of(address.to(bf16, bitcast=True), 16) + offsets, mask=mask).to(tl.float32)
    else:
        address = tl.load(pointers_ptr + 6 * n_tensors + tensor)
        grad = tl.load(tl.multiple_of(address.to(bf16, bitcast=True), 16) + offsets, mask=mask).to(tl.float32)
    return grad


@triton.jit
def _row_limit(pointers_ptr, n_tensors, tensor, start, limit, ROWS: tl.constexpr):
    """Where the program's elements end: the tensor's end, or with ROWS the end of the block's row."""
    if ROWS:
        row_len = tl.load(pointers_ptr + 8 * n_tensors + tensor)
        limit = tl.minimum(limit, (start // row_len + 1) * row_len)
    return limit


@triton.jit
def _adamw_kernel(
    pointers_ptr,  # int64 [11, n_tensors]: param, grad, exp_avg, exp_avg_sq, step, copy, bf16 grad, row_slot
    # addresses, row lengths (the last two for ROWS), float8 copy and float8 scale addresses (FLOAT8)
    block_tensor_ptr,  # int32 [n_blocks]: the tensor each program updates
    block_start_ptr,  # int64 [n_blocks]: the program's first element in that tensor
    numel_ptr,  # int64 [n_tensors]
    amax_ptr,  # int32 [n_tensors], zeroed: each tensor's amax as float32 bits (FLOAT8)
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
    GRAD32: tl.constexpr,  # a float32 gradient
    GRAD16: tl.constexpr,  # a bf16 gradient (added to the float32 one when both)
    COPY: tl.constexpr,  # write the parameter to a bf16 copy as well
    ROWS: tl.constexpr,  # the float32 gradient is a lookup's rows (_load_grad)
    FLOAT8: tl.constexpr,  # fold the updated parameter's absolute maximum into its tensor's amax
    BLOCK: tl.constexpr,
):
    tensor = tl.load(block_tensor_ptr + tl.program_id(0))
    start = tl.load(block_start_ptr + tl.program_id(0))
    offsets = start + tl.arange(0, BLOCK)
    limit = _row_limit(pointers_ptr, n_tensors, tensor, start, tl.load(numel_ptr + tensor), ROWS)
    if HAS_FOUND_INF:  # a skipped step touches no element
        limit = tl.where(tl.load(found_inf_ptr) == 1.0, 0, limit)
    mask = offsets < limit
    f32 = tl.pointer_type(tl.float32)
    param_ptr = tl.multiple_of(tl.load(pointers_ptr + tensor).to(f32, bitcast=True), 16)
    exp_avg_ptr = tl.multiple_of(tl.load(pointers_ptr + 2 * n_tensors + tensor).to(f32, bitcast=True), 16)
    exp_avg_sq_ptr = tl.multiple_of(tl.load(pointers_ptr + 3 * n_tensors + tensor).to(f32, bitcast=True), 16)
    step_ptr = tl.load(pointers_ptr + 4 * n_tensors + tensor).to(f32, bitcast=True)

    grad = _load_grad(pointers_ptr, n_tensors, tensor, start, offsets, mask, GRAD32, GRAD16, ROWS)
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
    if COPY:
        bf16 = tl.pointer_type(tl.bfloat16)
        copy_ptr = tl.multiple_of(tl.load(pointers_ptr + 5 * n_tensors + tensor).to(bf16, bitcast=True), 16)
        # Round to nearest even on the bits, as torch's .to(bfloat16) does; the GPU's conversion would too (and
        # was as fast), but Triton's interpreter truncates, and this way CPU tests run the code the GPU runs.
        bits = param.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(param != param, 0x7FC0, rounded)  # NaN stays NaN
        tl.store(copy_ptr + offsets, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    if FLOAT8:
        # |x| as bits: non-negative floats order as their bit patterns do, so an integer max is the float
        # max, exact and independent of the order the programs finish in (and a NaN's bits win, as in torch).
        bits = tl.where(mask, param.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0)
        # (tl.max is a jit function the interpreter cannot call; this combine it reduces with numpy)
        tl.atomic_max(amax_ptr + tensor, tl.reduce(bits, 0, tl.standard._elementwise_max))


@triton.jit
def _float8_kernel(
    pointers_ptr,  # the update's address table (rows 0, 9 and 10 are read)
    block_tensor_ptr,
    block_start_ptr,
    numel_ptr,
    amax_ptr,  # int32 [n_tensors]: the update's amaxes, as float32 bits
    found_inf_ptr,
    n_tensors,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Each updated parameter cast to float8 e4m3 with its tensorwise scale, the arithmetic of torchao's
    dynamic cast (``amax_to_scale``, then ``to_fp8_saturated``) and of torch's float32 -> e4m3fn conversion
    (round to nearest even, on the bits, so that the interpreter runs what the GPU runs)."""
    tensor = tl.load(block_tensor_ptr + tl.program_id(0))
    start = tl.load(block_start_ptr + tl.program_id(0))
    offsets = start + tl.arange(0, BLOCK)
    limit = tl.load(numel_ptr + tensor)
    if HAS_FOUND_INF:  # a skipped step keeps the float8 copy and scale it had
        limit = tl.where(tl.load(found_inf_ptr) == 1.0, 0, limit)
    mask = offsets < limit
    param_ptr = tl.multiple_of(tl.load(pointers_ptr + tensor).to(tl.pointer_type(tl.float32), bitcast=True), 16)
    data_ptr = tl.load(pointers_ptr + 9 * n_tensors + tensor).to(tl.pointer_type(tl.uint8), bitcast=True)
    scale_out = tl.load(pointers_ptr + 10 * n_tensors + tensor).to(tl.pointer_type(tl.float32), bitcast=True)
    # scale = E4M3_MAX / max(amax, AMAX_EPS) in float64, then rounded to float32, as torchao computes it
    amax = tl.load(amax_ptr + tensor).to(tl.float32, bitcast=True).to(tl.float64)
    floor = tl.full((), AMAX_EPS, tl.float64)
    scale = (tl.full((), E4M3_MAX, tl.float64) / tl.where(amax < floor, floor, amax)).to(tl.float32)
    if start == 0 and limit > 0:
        tl.store(scale_out, scale)
    x = tl.load(param_ptr + offsets, mask=mask, other=0.0) * scale
    nan = x != x
    x = tl.where(x > E4M3_MAX, E4M3_MAX, tl.where(x < -E4M3_MAX, -E4M3_MAX, x))  # saturate
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # Normal e4m3 (|x| >= 2^-6): drop 20 mantissa bits rounding to nearest even, rebias the exponent (127 -> 7).
    normal = (magnitude - (120 << 23) + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20
    # Subnormal (|x| < 2^-6, steps of 2^-9): adding 2^14, whose float32 spacing is 2^-9, rounds |x| to a
    # multiple of 2^-9 (nearest even), and the sum's low mantissa bits count the steps.
    steps = (magnitude.to(tl.float32, bitcast=True) + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    byte = tl.where(magnitude < (121 << 23), steps, normal) | sign
    byte = tl.where(nan, 0x7F | sign, byte)
    tl.store(data_ptr + offsets, byte.to(tl.uint8), mask=mask)


@triton.jit
def _add(a, b):  # tl.sum's combine; spelled out because the interpreter cannot call triton's own jit functions
    return a + b


@triton.jit
def _sum_squares_kernel(
    pointers_ptr,  # int64 [9, n_tensors], as the update's (rows 1 and 6, and 7 and 8 with ROWS, are read)
    block_tensor_ptr,
    block_start_ptr,
    numel_ptr,
    out_ptr,  # float32 [cdiv(n_blocks, BLOCKS_PER_PROGRAM)]: each program's sum of squares
    n_tensors,
    n_blocks,
    GRAD32: tl.constexpr,
    GRAD16: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCKS_PER_PROGRAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    total = tl.full([BLOCK], 0.0, tl.float32)  # (tl.zeros is a jit function the interpreter cannot call)
    for i in range(BLOCKS_PER_PROGRAM):  # several table entries per program: fewer, longer reductions
        entry = tl.program_id(0) * BLOCKS_PER_PROGRAM + i
        if entry < n_blocks:
            tensor = tl.load(block_tensor_ptr + entry)
            start = tl.load(block_start_ptr + entry)
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < _row_limit(pointers_ptr, n_tensors, tensor, start, tl.load(numel_ptr + tensor), ROWS)
            grad = _load_grad(pointers_ptr, n_tensors, tensor, start, offsets, mask, GRAD32, GRAD16, ROWS)
            grad = tl.where(mask, grad, 0.0)
            total += grad * grad
    tl.store(out_ptr + tl.program_id(0), tl.reduce(total, 0, _add))


class BlockTable:
    """Which tensor and which elements each program of the one launch updates, for fixed sizes. A tensor
    with a row length (``row_lens``, a lookup's rows) gets blocks that never cross a row: each program
    then reads one ``row_slot``."""

    def __init__(self, numels: list[int], device: torch.device, row_lens: list[int] | None = None) -> None:
        self.numels = list(numels)
        self.row_lens = list(row_lens) if row_lens is not None else [0] * len(numels)
        starts = []
        for n, row_len in zip(numels, self.row_lens, strict=True):
            if row_len:
                rows = torch.arange(n // row_len, dtype=torch.int64) * row_len
                starts.append((rows[:, None] + torch.arange(0, row_len, BLOCK, dtype=torch.int64)).reshape(-1))
            else:
                starts.append(torch.arange(triton.cdiv(n, BLOCK), dtype=torch.int64) * BLOCK)
        blocks = torch.tensor([len(t) for t in starts])
        self.block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), blocks).to(device)
        self.block_start = torch.cat(starts).to(device)
        self.numel = torch.tensor(numels, dtype=torch.int64, device=device)
        self.block = BLOCK
        self._amax: torch.Tensor | None = None

    def amax(self) -> torch.Tensor:
        """The float8 launch's scratch: one int32 amax (float32 bits) per tensor, zeroed for the next update."""
        if self._amax is None:
            self._amax = torch.zeros(len(self.numels), dtype=torch.int32, device=self.numel.device)
        return self._amax.zero_()


def tensor_rows(
    params: list[torch.Tensor],
    grads: list[torch.Tensor] | None,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    copies: list[torch.Tensor] | None,
    bf16_grads: list[torch.Tensor] | None,
    row_slots: list[torch.Tensor] | None = None,
    float8s: list[torch.Tensor] | None = None,
    float8_scales: list[torch.Tensor] | None = None,
) -> list[list[torch.Tensor]]:
    """The address table's tensor rows; a row that is not read holds the parameters (any valid address).
    (:func:`_addresses` puts the row lengths between the first eight and the float8 ones.)"""
    return [params, grads or params, exp_avgs, exp_avg_sqs, steps, copies or params, bf16_grads or params] + [
        row_slots or params,
        float8s or params,
        float8_scales or params,
    ]


def check_tensors(
    rows: list[list[torch.Tensor]],
    grad32: bool,
    grad16: bool,
    copy: bool,
    lookup_rows: bool = False,
    float8: bool = False,
) -> None:
    """The kernel reads raw addresses: contiguous, aligned tensors of one size per parameter; float32,
    but for the bf16 gradients and copies (and a lookup's rows, :func:`check_lookup_rows`), the float8
    copies (e4m3) and their scales (one float32 each)."""
    kinds = [
        ("parameter", torch.float32, True),
        ("gradient", torch.float32, grad32 and not lookup_rows),
        ("exp_avg", torch.float32, True),
        ("exp_avg_sq", torch.float32, True),
        ("copy", torch.bfloat16, copy),
        ("bf16 gradient", torch.bfloat16, grad16),
    ]
    for i, param in enumerate(rows[0]):
        for (kind, dtype, used), row in zip(kinds, rows[:4] + rows[5:7], strict=True):
            if used:
                check_tensor(kind, row[i], param, dtype)
        if lookup_rows:
            check_lookup_rows(rows[1][i], rows[7][i], param)
        if float8:
            check_tensor("float8 copy", rows[8][i], param, torch.float8_e4m3fn)
            scale = rows[9][i]
            if scale.dtype != torch.float32 or scale.numel() != 1:
                raise ValueError(f"a float8 scale must be one float32 value; got {scale.dtype} {tuple(scale.shape)}")


def check_tensor(kind: str, tensor: torch.Tensor, param: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.dtype != dtype or not tensor.is_contiguous() or tensor.data_ptr() % ALIGN:
        raise ValueError(
            f"the triton AdamW kernel needs a contiguous, {ALIGN}-byte aligned {dtype} {kind}; got a "
            f"{'contiguous' if tensor.is_contiguous() else 'strided'} {tensor.dtype} tensor of shape "
            f"{tuple(tensor.shape)} at address {tensor.data_ptr():#x} for a parameter of shape {tuple(param.shape)}: "
            "use trainer.step_impl=plain"
        )
    if tensor.numel() != param.numel():
        raise ValueError(f"a {kind} of shape {tuple(tensor.shape)} for a {tuple(param.shape)} parameter")


def check_lookup_rows(rows: torch.Tensor, row_slot: torch.Tensor, param: torch.Tensor) -> None:
    """A lookup's gradient for a ``[vocab, hidden]`` parameter: float32 ``rows`` ``[n, hidden]`` and int32
    ``row_slot`` ``[vocab]`` (:class:`nemo_lite.training.fast.lookup_gradient.LookupGradient`)."""
    shape = tuple(param.shape)
    if param.dim() != 2 or rows.dim() != 2 or rows.shape[1] != param.shape[1] or row_slot.shape != param.shape[:1]:
        raise ValueError(
            f"a lookup gradient for a {shape} parameter needs rows [n, {shape[-1]}] and a row_slot [{shape[0]}]; "
            f"got rows {tuple(rows.shape)} and row_slot {tuple(row_slot.shape)}"
        )
    if rows.dtype != torch.float32 or not rows.is_contiguous() or rows.data_ptr() % ALIGN:
        raise ValueError(f"a lookup gradient's rows must be a contiguous, aligned float32 tensor; got {rows.dtype}")
    if row_slot.dtype != torch.int32 or not row_slot.is_contiguous():
        raise ValueError(f"a lookup gradient's row_slot must be a contiguous int32 tensor; got {row_slot.dtype}")


def _grads_ok(grads: list[torch.Tensor] | None, dtype: torch.dtype, numels: list[int]) -> bool:
    """The per-step check of new gradients, kept cheap (it runs while the GPU waits)."""
    if grads is None:
        return True
    return all(g.dtype == dtype and g.is_contiguous() for g in grads) and [g.numel() for g in grads] == numels


def _gradients_ok(grads, bf16_grads, row_slots, params: list[torch.Tensor]) -> bool:
    """The per-step check of new gradients (float32 or a lookup's rows, and bf16), kept cheap."""
    numels = [p.numel() for p in params]
    if row_slots is not None:
        grads_ok = _lookup_rows_ok(grads, row_slots, params)
    else:
        grads_ok = _grads_ok(grads, torch.float32, numels)
    return grads_ok and _grads_ok(bf16_grads, torch.bfloat16, numels)


def _lookup_rows_ok(grads: list[torch.Tensor], row_slots: list[torch.Tensor], params: list[torch.Tensor]) -> bool:
    return all(
        g.dtype == torch.float32
        and g.is_contiguous()
        and g.dim() == 2
        and s.dtype == torch.int32
        and s.is_contiguous()
        and p.dim() == 2
        and g.shape[1] == p.shape[1]
        and s.shape == p.shape[:1]
        for g, s, p in zip(grads, row_slots, params, strict=True)
    )


def _table(
    table: BlockTable | None, numels: list[int], device: torch.device, row_lens: list[int]
) -> tuple[BlockTable, bool]:
    if table is None or table.numels != numels or table.block != BLOCK or table.row_lens != row_lens:
        return BlockTable(numels, device, row_lens), True
    return table, False


def _addresses(rows: list[list[torch.Tensor]], device: torch.device, row_lens: list[int]) -> tuple[torch.Tensor, bool]:
    """The int64 table: the tensors' addresses, the row lengths as row 8 (read with ROWS), then the float8
    copies' and scales' addresses (rows 9 and 10, read with FLOAT8)."""
    addresses = [[t.data_ptr() for t in row] for row in rows]
    aligned = not any(a % ALIGN for i, row in enumerate(addresses) if i not in (4, 7, 9) for a in row)
    # Non-blocking: a blocking copy would make the host wait for the stream. From pageable memory the
    # driver stages the bytes before it returns, so the CPU tensor may go away at once.
    table = torch.tensor(addresses[:8] + [row_lens] + addresses[8:], dtype=torch.int64)
    return table.to(device, non_blocking=True), aligned


class Prepared(NamedTuple):
    """The host work of one update launch, done ahead of it (:func:`prepare`)."""

    table: BlockTable
    pointers: torch.Tensor  # int64 [11, n_tensors] on the device
    flags: tuple[bool, bool, bool, bool, bool]  # float32 gradients, bf16 gradients, copies, lookup rows, float8


def _row_lens(params: list[torch.Tensor], row_slots: list[torch.Tensor] | None) -> list[int]:
    return [p.shape[-1] for p in params] if row_slots is not None else [0] * len(params)


def prepare(
    params: list[torch.Tensor],
    grads: list[torch.Tensor] | None,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    copies: list[torch.Tensor] | None = None,
    bf16_grads: list[torch.Tensor] | None = None,
    row_slots: list[torch.Tensor] | None = None,
    float8s: list[torch.Tensor] | None = None,
    float8_scales: list[torch.Tensor] | None = None,
    table: BlockTable | None = None,
) -> Prepared:
    """Checks, the block table (``table`` when it fits) and the address table, copied to the device
    without blocking: everything :func:`launch` needs but the hyperparameters. With ``row_slots`` each
    of ``grads`` is a lookup's rows (:mod:`nemo_lite.training.fast.lookup_gradient`), not a dense gradient.
    With ``float8s`` (e4m3 tensors shaped like the parameters) and ``float8_scales`` (float32 scalars) the
    launch writes each updated parameter's tensorwise float8 cast and its scale there."""
    if grads is None and bf16_grads is None:
        raise ValueError("adamw_ needs float32 gradients, bf16 gradients, or both")
    if row_slots is not None and grads is None:
        raise ValueError("row_slots say where a lookup's rows go: they need the rows, as grads")
    if (float8s is None) != (float8_scales is None):
        raise ValueError("float8 copies and their scales go together: give both float8s and float8_scales")
    device = params[0].device
    numels = [p.numel() for p in params]
    rows = tensor_rows(
        params, grads, exp_avgs, exp_avg_sqs, steps, copies, bf16_grads, row_slots, float8s, float8_scales
    )
    flags = (grads is not None, bf16_grads is not None, copies is not None, row_slots is not None, float8s is not None)
    row_lens = _row_lens(params, row_slots)
    table, new = _table(table, numels, device, row_lens)
    if new:  # parameters, state and copies are checked once, with the table
        check_tensors(rows, *flags)
    pointers, aligned = _addresses(rows, device, row_lens)
    if not (aligned and _gradients_ok(grads, bf16_grads, row_slots, params)):
        check_tensors(rows, *flags)  # names the offending tensor
    return Prepared(table, pointers, flags)


def launch(
    prepared: Prepared,
    steps: list[torch.Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> None:
    """The step counts incremented (not with ``found_inf`` equal to 1), then the one kernel launch."""
    torch._foreach_add_(steps, 1)
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    scale = grad_scale if grad_scale is not None else steps[0]  # any valid pointer when unused
    table = prepared.table
    float8 = prepared.flags[4]
    amax = table.amax() if float8 else table.numel  # any valid pointer when unused
    _adamw_kernel[(table.block_tensor.numel(),)](
        prepared.pointers,
        table.block_tensor,
        table.block_start,
        table.numel,
        amax,
        scale,
        found_inf if found_inf is not None else steps[0],
        len(steps),
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        HAS_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        GRAD32=prepared.flags[0],
        GRAD16=prepared.flags[1],
        COPY=prepared.flags[2],
        ROWS=prepared.flags[3],
        FLOAT8=float8,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    if float8:
        _float8_kernel[(table.block_tensor.numel(),)](
            prepared.pointers,
            table.block_tensor,
            table.block_start,
            table.numel,
            amax,
            found_inf if found_inf is not None else steps[0],
            len(steps),
            HAS_FOUND_INF=found_inf is not None,
            BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )


def adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor] | None,
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    copies: list[torch.Tensor] | None = None,
    bf16_grads: list[torch.Tensor] | None = None,
    row_slots: list[torch.Tensor] | None = None,
    float8s: list[torch.Tensor] | None = None,
    float8_scales: list[torch.Tensor] | None = None,
    table: BlockTable | None = None,
    **hyper,
) -> BlockTable:
    """One AdamW step in place, all tensors in one launch; ``steps`` (float32 scalars on the same
    device) are incremented first, as torch's optimizer does. ``hyper``: :func:`launch`'s keywords (lr,
    betas, eps, weight decay, and the device tensors ``grad_scale`` and ``found_inf``; with ``found_inf``
    equal to 1 nothing changes, steps included, as in torch's fused AdamW). The gradient of a parameter
    is ``grads`` (float32; a lookup's rows with ``row_slots``), ``bf16_grads``, or their sum when both are
    given; with ``copies`` each updated parameter is also written, rounded, into its bf16 copy, and with
    ``float8s`` and ``float8_scales`` cast to float8 e4m3 with its tensorwise scale. Returns
    the block table, which the caller passes back on later steps (it depends only on the sizes).
    :func:`prepare` and :func:`launch` are its two halves, for callers that do the first earlier."""
    if not params:
        return table
    prepared = prepare(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        steps,
        copies=copies,
        bf16_grads=bf16_grads,
        row_slots=row_slots,
        float8s=float8s,
        float8_scales=float8_scales,
        table=table,
    )
    launch(prepared, steps, **hyper)
    return prepared.table


BLOCKS_PER_PROGRAM = 8  # sum_of_squares: 8 table entries (8192 elements) per program


def sum_of_squares(
    grads: list[torch.Tensor] | None,
    bf16_grads: list[torch.Tensor] | None = None,
    table: BlockTable | None = None,
    *,
    params: list[torch.Tensor] | None = None,
    row_slots: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, BlockTable]:
    """The sum over all elements of the squared gradient (``grads``, ``bf16_grads`` or their sum, as
    the update reads it), in float32: one launch over the update's block table (built here if
    ``table`` does not fit), each program summing its blocks, then torch summing the programs'
    results, in a fixed order. With ``row_slots`` each of ``grads`` is a lookup's rows, for the
    ``params`` of the same position. Returns the sum (a float32 scalar on the device) and the table."""
    first = grads if grads is not None else bf16_grads
    if not first:
        raise ValueError("sum_of_squares needs float32 gradients, bf16 gradients, or both")
    if row_slots is not None and (grads is None or params is None):
        raise ValueError("a lookup's rows (row_slots) need the rows, as grads, and their params")
    shapes = params if row_slots is not None else first
    device = first[0].device
    numels = [t.numel() for t in shapes]
    row_lens = _row_lens(shapes, row_slots)
    table, _ = _table(table, numels, device, row_lens)
    rows = [shapes, grads or first, shapes, shapes, shapes, shapes, bf16_grads or first, row_slots or shapes]
    pointers, aligned = _addresses(rows, device, row_lens)
    flags = (grads is not None, bf16_grads is not None, False, row_slots is not None, False)
    if not (aligned and _gradients_ok(grads, bf16_grads, row_slots, shapes)):
        for i, shape in enumerate(shapes):  # names the offending gradient
            if row_slots is not None:
                check_lookup_rows(grads[i], row_slots[i], shape)
            elif grads is not None:
                check_tensor("gradient", grads[i], shape, torch.float32)
            if bf16_grads is not None:
                check_tensor("bf16 gradient", bf16_grads[i], shape, torch.bfloat16)
    return prepared_sum_of_squares(Prepared(table, pointers, flags)), table


def prepared_sum_of_squares(prepared: Prepared) -> torch.Tensor:
    """:func:`sum_of_squares` over the gradients of an update's :func:`prepare` (its address table
    holds them), without building another table."""
    table = prepared.table
    n_blocks = table.block_tensor.numel()
    partial = torch.empty(triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM), dtype=torch.float32, device=table.numel.device)
    _sum_squares_kernel[(partial.numel(),)](
        prepared.pointers,
        table.block_tensor,
        table.block_start,
        table.numel,
        partial,
        table.numel.numel(),
        n_blocks,
        GRAD32=prepared.flags[0],
        GRAD16=prepared.flags[1],
        ROWS=prepared.flags[3],
        BLOCKS_PER_PROGRAM=BLOCKS_PER_PROGRAM,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
    return partial.sum()
