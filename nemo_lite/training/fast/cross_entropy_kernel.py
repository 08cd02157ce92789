"""Cross-entropy over a vocabulary in one Triton pass per row that also writes the gradient (needs triton).

The compiled head loss reads the logits three times: once for the log-sum-exp in forward, and in backward
once more to write their gradient (softmax minus one-hot). With a 128k vocabulary the logits of a step are
gigabytes, so those passes are bound by memory traffic (``scripts/bench_loss.py`` times them). Here one program
per row reads its logits for the log-sum-exp and reads them again, from L2 where they are still there, to
overwrite them with the gradient, already in forward: ``(softmax - onehot) * scale``, rounded to the logits'
dtype. The caller passes the gradient it expects the loss to receive as ``scale`` (the trainer knows it: one
over the step's label count), so the values are those autograd would write; the backward multiplies by the
ratio of the gradient it does receive to ``scale`` (exactly 1.0 when they agree).

Rows whose label is ``ignore_index`` get loss 0 and gradient 0. Arithmetic in float32 whatever the logits'
dtype. ``linear_cross_entropy_sum`` wraps it with the output projection as an autograd function.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8192  # elements of a row per iteration; scripts/bench_loss.py
NUM_WARPS = 16


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,  # [rows, n_classes], rows `row_stride` apart, classes contiguous; overwritten with the gradient
    labels_ptr,  # int64 [rows]
    loss_ptr,  # float32 [rows]: log-sum-exp minus the label's logit, 0 for ignored rows
    scale_ptr,  # float32 []: the gradient written is (softmax - onehot) * scale
    n_classes,
    row_stride,
    ignore_index,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    label = tl.load(labels_ptr + row)
    cols = tl.arange(0, BLOCK)
    # Pass 1: running maximum and sum of exponentials, rescaled once per block.
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.full((), 0.0, tl.float32)
    for start in range(0, n_classes, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n_classes, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.reduce(x, 0, _max))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.reduce(tl.exp(x - new_max), 0, _add)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    keep = label != ignore_index
    valid = (label >= 0) & (label < n_classes)
    label_logit = tl.load(base + label, mask=keep & valid, other=0.0).to(tl.float32)
    # A label outside the classes gives a NaN loss (the trainer reports non-finite steps) instead of a wild read.
    tl.store(loss_ptr + row, tl.where(keep, tl.where(valid, lse - label_logit, float("nan")), 0.0))
    if WRITE_GRAD:
        # Pass 2: the row again (mostly from L2), overwritten with its gradient; ignored rows get zeros.
        scale = tl.where(keep, tl.load(scale_ptr), 0.0)
        for start in range(0, n_classes, BLOCK):
            in_row = start + cols < n_classes
            x = tl.load(base + start + cols, mask=in_row, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)) * scale
            tl.store(base + start + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def cross_entropy_rows_(
    logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None, *, ignore_index: int = -100
) -> torch.Tensor:
    """Per-row loss (float32) of ``logits`` [rows, classes] against ``labels``. With ``scale`` (a float32
    0-d tensor on the logits' device) the logits are overwritten with ``(softmax - onehot) * scale``;
    without it they are left as they are."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(
            f"logits must be [rows, classes] with contiguous classes; got {tuple(logits.shape)}, "
            f"strides {logits.stride()}"
        )
    if labels.shape != logits.shape[:1] or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{logits.shape[0]}]; got {labels.dtype} {tuple(labels.shape)}")
    if scale is not None and (scale.dim() != 0 or scale.dtype != torch.float32 or scale.device != logits.device):
        raise ValueError(
            f"scale must be a float32 0-d tensor on {logits.device}; got {scale.dtype} "
            f"{tuple(scale.shape)} on {scale.device}"
        )
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        _cross_entropy_kernel[(logits.shape[0],)](
            logits,
            labels,
            loss,
            scale if scale is not None else loss,  # not read without WRITE_GRAD
            logits.shape[1],
            logits.stride(0),
            ignore_index,
            WRITE_GRAD=scale is not None,
            BLOCK=min(BLOCK, triton.next_power_of_2(logits.shape[1])),
            num_warps=NUM_WARPS,
        )
    return loss


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, labels_T, scale, ignore_index):
        logits_TV = hidden_TH @ weight_VH.t()
        loss = cross_entropy_rows_(logits_TV, labels_T, scale, ignore_index=ignore_index).sum()
        ctx.save_for_backward(hidden_TH, weight_VH, logits_TV, scale)  # logits_TV now holds their gradient
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden_TH, weight_VH, grad_logits_TV, scale = ctx.saved_tensors
        ratio = (grad_loss.float() / scale).to(hidden_TH.dtype)  # 1.0 exactly when the caller's scale was right
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_logits_TV @ weight_VH) * ratio
        if ctx.needs_input_grad[1]:
            grad_weight = grad_logits_TV.t() @ (hidden_TH * ratio)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(
    hidden_TH: torch.Tensor,
    weight_VH: torch.Tensor,
    labels_T: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sum over tokens of -log softmax(hidden @ weight^T)[label] (float32), with the logits' gradient written
    in forward. ``scale``: the gradient the sum is expected to receive (a float32 0-d tensor; default 1)."""
    if hidden_TH.dtype != weight_VH.dtype:
        raise ValueError(f"hidden and weight must have one dtype; got {hidden_TH.dtype} and {weight_VH.dtype}")
    if not (torch.is_grad_enabled() and (hidden_TH.requires_grad or weight_VH.requires_grad)):
        logits_TV = hidden_TH @ weight_VH.t()  # evaluation: the log-sum-exp pass only
        return cross_entropy_rows_(logits_TV, labels_T, None, ignore_index=ignore_index).sum()
    if scale is None:
        scale = torch.ones((), dtype=torch.float32, device=hidden_TH.device)
    return _LinearCrossEntropySum.apply(hidden_TH, weight_VH, labels_T, scale.float(), ignore_index)
