"""AdamW (fused on GPU) with linear warmup and cosine decay to a floor."""

from __future__ import annotations

import math

import torch
from torch import nn

from nemo_lite.training.config import OptimSection


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view of its storage); any other tensor as it is."""
    return getattr(tensor, "_local_tensor", tensor)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, whose fused step runs on the local shards of FSDP2's DTensor parameters.

    FSDP2 shards every parameter on dim 0, so AdamW, an elementwise update, on each rank's shards is
    the update of the whole tensors. Handing the fused kernel the plain local tensors skips DTensor's
    dispatch, which cost ~4 ms of host time per step on the 1B model while the GPU waited. State
    (``exp_avg``, ``exp_avg_sq``, ``step``) stays on the DTensors torch created, so state dicts and
    ``torch.distributed.checkpoint`` see the usual optimizer.
    """

    def gather(self, group: dict) -> tuple[list[list[torch.Tensor]], bool]:
        """The group's parameters that have gradients, with their gradients and state (created on the
        first call): ``[params, grads, exp_avgs, exp_avg_sqs, steps]`` and whether any is complex."""
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
        has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
        return [params, grads, exp_avgs, exp_avg_sqs, steps], has_complex

    def fused_update(self, group: dict, lists: list[list[torch.Tensor]], has_complex: bool, grad_scale=None) -> None:
        """The fused kernel on (a part of) a group's ``gather`` lists, on the local shards."""
        from torch.optim.adam import adam

        params, grads, exp_avgs, exp_avg_sqs, steps = lists
        beta1, beta2 = group["betas"]
        adam(
            [local_shard(t) for t in params],
            [local_shard(t) for t in grads],
            [local_shard(t) for t in exp_avgs],
            [local_shard(t) for t in exp_avg_sqs],
            [],
            steps,  # plain device tensors
            amsgrad=False,
            has_complex=has_complex,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            foreach=group["foreach"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            fused=True,
            grad_scale=grad_scale,
            found_inf=getattr(self, "found_inf", None),
            decoupled_weight_decay=group["decoupled_weight_decay"],
        )

    overlap: OverlappedUpdate | None = None  # set by OverlappedUpdate: step() then runs in pieces

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or not all(g["fused"] and not g["amsgrad"] for g in self.param_groups):
            return super().step(closure)
        if self.overlap is not None:
            self.overlap.run(getattr(self, "grad_scale", None))
            return None
        for group in self.param_groups:
            lists, has_complex = self.gather(group)
            self.fused_update(group, lists, has_complex, getattr(self, "grad_scale", None))
        return None


def build_optimizer(model: nn.Module, cfg: OptimSection) -> torch.optim.AdamW:
    """Weight decay on matrices only; norms, biases and other vectors are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    fused = on_cuda if cfg.fused == "auto" else cfg.fused == "true"
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def steps_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Fused AdamW can clip inside its kernel (``grad_scale``)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def clip_scale(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor | None:
    """The divisor fused AdamW applies to every gradient to clip it (None: no clipping)."""
    return torch.clamp((grad_norm.detach().float() + 1e-6) / max_norm, min=1.0) if max_norm > 0 else None


def clipped_step(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, max_norm: float) -> None:
    """One fused AdamW step with the gradients clipped inside the update kernel.

    The kernel divides each gradient by ``max(1, (grad_norm + 1e-6) / max_norm)`` (torch's
    ``clip_grad_norm_`` factor, as a float32 device tensor), so clipping costs no extra pass over the
    gradients and no host sync. ``max_norm <= 0`` turns clipping off.
    """
    if not steps_on_device(optimizer):
        raise ValueError("clipped_step needs fused AdamW (optim.fused=true, or auto on a GPU)")
    if max_norm <= 0:
        optimizer.step()
        return
    optimizer.grad_scale = clip_scale(grad_norm, max_norm)
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


class OverlappedUpdate:
    """Makes ``optimizer.step()`` (and :func:`clipped_step`) run the fused update cut by module on a
    side CUDA stream, so the next step's forward starts on a module as soon as that module is updated.

    ``modules`` come in the order the forward runs them (embedding, blocks, final norm, head); each
    parameter belongs to the first module that holds it (a tied head to the embedding). The forward
    calls :meth:`wait` before each module (``LlamaForCausalLM.before_module``), so the main stream waits
    for that module's update only, while the side stream updates the modules after it. The update is
    the same kernel on the same tensors, only cut into pieces: bitwise the one fused step. Anything
    else that reads parameters or optimizer state calls :meth:`wait_all` first. Without CUDA the pieces
    run in order, at once.

    The memory-bound update then shares the GPU with the forward's compute-bound matmuls instead of
    running alone between the steps; what stays exposed is the first module's update (the embedding).
    """

    def __init__(self, optimizer: AdamW, modules: list[nn.Module], device: torch.device) -> None:
        if not isinstance(optimizer, AdamW) or not steps_on_device(optimizer):
            raise ValueError("the overlapped update needs nemo_lite's fused AdamW (optim.fused=true, or auto on a GPU)")
        self.optimizer = optimizer
        self.unit_of: dict[int, int] = {}
        for unit, module in enumerate(modules):
            for param in module.parameters():
                self.unit_of.setdefault(id(param), unit)
        missing = sum(id(p) not in self.unit_of for group in optimizer.param_groups for p in group["params"])
        if missing:
            raise ValueError(f"{missing} optimized parameter(s) belong to none of the given modules")
        self.n_units = len(modules)
        # A module waits for the last unit that holds one of its parameters; units finish in order.
        self.wait_unit = {
            id(m): max(self.unit_of[id(p)] for p in m.parameters())
            for m in modules
            if next(m.parameters(), None) is not None
        }
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.events: list[torch.cuda.Event | None] = [None] * self.n_units
        optimizer.overlap = self

    def run(self, scale: torch.Tensor | None) -> None:
        """Queue one update (gradients divided by ``scale``); the gradients may be dropped after it."""
        opt = self.optimizer
        work: list[list[tuple]] = [[] for _ in range(self.n_units)]
        grads: list[torch.Tensor] = []
        for group in opt.param_groups:  # state is created here, on the current stream, before the fork
            lists, has_complex = opt.gather(group)
            grads += lists[1]
            split: list[list[list[torch.Tensor]]] = [[[] for _ in lists] for _ in range(self.n_units)]
            for i, param in enumerate(lists[0]):
                for column, values in zip(split[self.unit_of[id(param)]], lists, strict=True):
                    column.append(values[i])
            for unit, unit_lists in enumerate(split):
                if unit_lists[0]:
                    work[unit].append((group, unit_lists, has_complex))
        if self.stream is None:
            for unit_work in work:
                for group, unit_lists, has_complex in unit_work:
                    opt.fused_update(group, unit_lists, has_complex, scale)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        with torch.cuda.stream(self.stream):
            for unit, unit_work in enumerate(work):
                for group, unit_lists, has_complex in unit_work:
                    opt.fused_update(group, unit_lists, has_complex, scale)
                self.events[unit] = self.stream.record_event()
        # The gradients (and the scale) are freed by the caller while this stream may still read them:
        # the allocator must not hand their memory to the main stream before the update is done.
        for tensor in grads + ([scale] if scale is not None else []):
            local_shard(tensor).record_stream(self.stream)

    def wait(self, module: nn.Module) -> None:
        """Make the current stream wait until ``module``'s parameters are updated (no host sync)."""
        unit = self.wait_unit.get(id(module))
        if unit is None or self.events[unit] is None:
            return
        torch.cuda.current_stream(self.stream.device).wait_event(self.events[unit])
        for earlier in range(unit + 1):
            self.events[earlier] = None

    def wait_all(self) -> None:
        """Make the current stream wait for the whole update (before reading parameters or state)."""
        if self.stream is not None and any(e is not None for e in self.events):
            torch.cuda.current_stream(self.stream.device).wait_stream(self.stream)
        self.events = [None] * self.n_units


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine to `min_lr_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimSection, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=cfg.warmup_steps, max_steps=max_steps, min_lr_ratio=cfg.min_lr_ratio),
    )
