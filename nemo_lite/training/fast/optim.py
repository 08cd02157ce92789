"""Fused AdamW for the fast step: on the local shards of FSDP2's parameters, with torch's kernel or one
Triton launch over every tensor, clipping and skipping inside the kernel, optionally writing bf16 weight
copies or float8 weights and reading an embedding's lookup gradient as rows."""

from __future__ import annotations

import importlib.util
import operator

import torch

from nemo_lite.training.distributed import local_shard
from nemo_lite.training.fast.lookup_gradient import LookupGradient
from nemo_lite.training.optimizers import OwnKernelFlags


def clip_factor(grad_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch's ``clip_grad_norm_`` factor as a divisor, ``max(1, (grad_norm + 1e-6) / max_norm)``: a float32
    device tensor, no host sync."""
    return torch.clamp((grad_norm.detach().float() + 1e-6) / max_norm, min=1.0)


class FusedAdamW(OwnKernelFlags, torch.optim.AdamW):
    """torch's fused AdamW run on the local shards of FSDP2's DTensor parameters, with torch's kernel
    (``kernel="torch"``) or nemo_lite's Triton kernel (``kernel="triton"``,
    :mod:`nemo_lite.training.fast.adamw_kernel`: the same arithmetic, fewer bytes moved).

    :meth:`step` takes ``grad_scale`` (every gradient is divided by it first: the clip) and ``found_inf``
    (1.0 skips the step inside the kernel), both float32 device scalars, so neither needs a host sync.

    FSDP2 shards every parameter on dim 0, so AdamW, an elementwise update, on each rank's shards is
    the update of the whole tensors. Handing the fused kernel the plain local tensors skips DTensor's
    dispatch, whose host time per tensor the GPU would otherwise wait for. State
    (``exp_avg``, ``exp_avg_sq``, ``step``) stays on the DTensors torch created, so state dicts and
    ``torch.distributed.checkpoint`` see the usual optimizer, whichever kernel wrote it.

    With the Triton kernel the optimizer can also keep bf16 weight copies and float8 weights up to date
    (:meth:`keep_weight_copies`, :meth:`keep_float8_weights`) and compute the gradient norm over its
    launches' block tables (:meth:`grad_norm`).
    """

    def __init__(self, params, *args, kernel: str = "torch", **kwargs) -> None:
        if kernel not in ("torch", "triton"):
            raise ValueError(f"kernel={kernel!r} is not valid; choose torch or triton")
        super().__init__(params, *args, fused=True, **kwargs)
        self.kernel = kernel
        self._kernel_tables: dict = {}  # per launch: the Triton kernel's block table (sizes only)
        self._copies: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> bf16 weight copy (keep_weight_copies)
        self._float8: dict = {}  # parameter -> its float8 weight, a torchao Float8TrainingTensor (keep_float8_weights)
        self._lookups: dict[torch.Tensor, LookupGradient] = {}  # parameter -> its lookups' rows (keep_lookup_gradient)
        self._prepared: tuple | None = None  # prepare_step's work for the next step
        if kernel == "triton" and importlib.util.find_spec("triton") is None:
            raise ValueError("the triton AdamW kernel needs the triton package (CUDA builds of torch ship it)")

    @torch.no_grad()
    def step(self, closure=None, *, grad_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None):
        if closure is not None or any(g["amsgrad"] for g in self.param_groups):
            if grad_scale is not None or found_inf is not None:
                raise ValueError("grad_scale and found_inf need the fused step (no closure, no amsgrad)")
            return super().step(closure)
        if self.kernel == "triton":
            self._triton_step(grad_scale, found_inf)
            return None
        from torch.optim.adam import adam

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
            has_complex = self._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
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
                found_inf=found_inf,
                decoupled_weight_decay=group["decoupled_weight_decay"],
            )
        return None

    # ---- bf16 weight copies  ------------------------------------------------

    def keep_weight_copies(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """From now on each ``(param, copy)`` pair's gradient is read from the bf16 ``copy`` (the layer
        multiplies by it), and every step writes the updated parameter into the copy as well. The
        parameters stay what state dicts and checkpoints hold (:mod:`nemo_lite.training.fast.swaps`)."""
        if self.kernel != "triton":
            raise ValueError("bf16 weight copies are written by the triton AdamW kernel: it needs kernel='triton'")
        for param, copy in pairs:
            if copy.dtype != torch.bfloat16 or copy.shape != param.shape or not copy.is_leaf:
                shape = tuple(param.shape)
                raise ValueError(f"a weight copy must be a bf16 leaf tensor shaped like its parameter, {shape}")
        self._copies = dict(pairs)
        self._kernel_tables.clear()
        self.refresh_weight_copies()

    def keep_float8_weights(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """From now on each ``(param, float8_weight)`` pair's gradient is read from the float8 weight's bf16
        ``.grad`` (a torchao ``Float8TrainingTensor`` that the layer multiplies by,
        :mod:`nemo_lite.training.fast.float8_weights`), and every step writes the updated parameter's
        tensorwise float8 e4m3 cast and its scale into it. A parameter has a bf16 copy or a float8 weight,
        not both."""
        if self.kernel != "triton":
            raise ValueError("float8 weights are written by the triton AdamW kernel: it needs kernel='triton'")
        for param, f8 in pairs:
            data = getattr(f8, "_data", None)
            if data is None or data.dtype != torch.float8_e4m3fn or f8.shape != param.shape or not f8.is_leaf:
                shape = tuple(param.shape)
                raise ValueError(f"a float8 weight must be a leaf e4m3 Float8TrainingTensor shaped {shape}")
            if param in self._copies:
                raise ValueError(f"a {tuple(param.shape)} parameter has a bf16 copy already: it cannot have both")
        self._float8 = dict(pairs)
        self._kernel_tables.clear()
        self.refresh_weight_copies()

    @torch.no_grad()
    def refresh_weight_copies(self) -> None:
        """Round every parameter into its copy, and cast it into its float8 weight, again (after anything
        but a step changed the parameters)."""
        if self._copies:
            torch._foreach_copy_(list(self._copies.values()), list(self._copies))
        if self._float8:
            from nemo_lite.training.fast.float8_weights import cast_

            cast_(self._float8)

    def _grad_holder(self, param: torch.Tensor) -> torch.Tensor | None:
        """The tensor a layer multiplies by in place of ``param`` (a bf16 copy or a float8 weight), whose
        ``.grad`` is bf16, or None."""
        copy = self._copies.get(param)
        return copy if copy is not None else self._float8.get(param)

    def keep_lookup_gradient(self, param: torch.Tensor, lookups: LookupGradient) -> None:
        """From now on ``param``'s float32 gradient is read from ``lookups``, the rows of its embedding
        lookups (:mod:`nemo_lite.training.fast.lookup_gradient`), instead of ``param.grad``."""
        if self.kernel != "triton":
            raise ValueError("a lookup gradient is read by the triton AdamW kernel: it needs kernel='triton'")
        if lookups.shape != tuple(param.shape) or not any(param is p for g in self.param_groups for p in g["params"]):
            raise ValueError(
                f"the lookup gradient {lookups.shape} is not for a {tuple(param.shape)} parameter of this optimizer"
            )
        self._lookups[param] = lookups
        self._kernel_tables.clear()

    def _grad32(self, param: torch.Tensor) -> torch.Tensor | None:
        """``param``'s float32 gradient: ``param.grad``, or its lookups' rows (then ``param.grad`` must be None)."""
        lookups = self._lookups.get(param)
        if lookups is None or not lookups:
            return param.grad
        if param.grad is not None:
            raise ValueError(
                f"a {tuple(param.shape)} parameter has a dense gradient and a lookup gradient: its lookups' rows "
                "replace param.grad, so nothing else may write param.grad"
            )
        return lookups.rows()[1]

    def gradients(self, param: torch.Tensor) -> list[torch.Tensor]:
        """The gradients this optimizer adds up for ``param``: its own (float32; its lookups' rows when it
        has them) and its copy's or float8 weight's (bf16)."""
        holder = self._grad_holder(param)
        return [g for g in (self._grad32(param), None if holder is None else holder.grad) if g is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._prepared = None
        for lookups in self._lookups.values():
            lookups.clear()
        for copy in (*self._copies.values(), *self._float8.values()):
            if set_to_none:
                copy.grad = None
            elif copy.grad is not None:
                copy.grad.zero_()

    def _triton_lists(self, init_state: bool) -> dict[tuple, dict[str, list[torch.Tensor]]]:
        """The kernel's launches: per param group and per kind of gradient (float32, bf16 from a copy or a
        float8 weight, or both, as a tied embedding has) and whether there is a bf16 copy or a float8 weight
        to write, the lists of tensors."""
        copies, lookups, float8 = self._copies, self._lookups, self._float8
        out: dict[tuple, dict[str, list[torch.Tensor]]] = {}
        kinds = ("params", "grads", "bf16_grads", "copies", "row_slots", "float8s", "float8_scales", "state")
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                copy, f8 = copies.get(param), float8.get(param)
                holder = copy if copy is not None else f8
                bf16_grad = None if holder is None else holder.grad
                grad = self._grad32(param)
                if grad is None and bf16_grad is None:
                    continue
                rows = param in lookups and bool(lookups[param])
                key = (index, grad is not None, bf16_grad is not None, copy is not None, rows, f8 is not None)
                lists = out.setdefault(key, {k: [] for k in kinds})
                lists["params"].append(local_shard(param))
                if grad is not None:
                    lists["grads"].append(local_shard(grad))
                if rows:
                    lists["row_slots"].append(lookups[param].rows()[0])
                if copy is not None:
                    lists["copies"].append(copy)
                if f8 is not None:
                    lists["float8s"].append(f8._data)
                    lists["float8_scales"].append(f8._scale)
                if bf16_grad is not None:
                    lists["bf16_grads"].append(bf16_grad)
                if init_state:
                    state = self.state[param]
                    if not state:  # torch's fused AdamW state, so checkpoints do not depend on the kernel
                        state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    lists["state"].append(state)
        return out

    def grad_norm(self) -> torch.Tensor:
        """The 2-norm of the gradients this optimizer will use (a copy's added to its parameter's own), from
        the kernel's block tables: one launch per list, float32 sums of squares summed in a fixed order."""
        from nemo_lite.training.fast import adamw_kernel

        if self.kernel != "triton":
            raise ValueError("grad_norm runs the triton kernels; with kernel=torch use torch.nn.utils.get_total_norm")
        total = None
        if self._prepared is not None and self._prepared_is_current():  # the update's own address tables
            for _, _, prepared in self._prepared[2]:
                squares = adamw_kernel.prepared_sum_of_squares(prepared)
                total = squares if total is None else total + squares
            return torch.zeros(()) if total is None else total.sqrt()
        for key, lists in self._triton_lists(init_state=False).items():
            squares, self._kernel_tables[key] = adamw_kernel.sum_of_squares(
                lists["grads"] or None,
                lists["bf16_grads"] or None,
                table=self._kernel_tables.get(key),
                params=lists["params"],
                row_slots=lists["row_slots"] or None,
            )
            total = squares if total is None else total + squares
        if total is None:
            return torch.zeros(())
        return total.sqrt()

    def prepare_step(self) -> None:
        """Do the next triton step's host work now: its launch lists, block tables and address tables,
        copied to the device without blocking. The trainer calls it before the step's one host sync, so
        that after the sync only the launches remain while the GPU waits; :meth:`grad_norm` reads the
        same tables. :meth:`step` redoes the work if any gradient tensor was replaced in between;
        :meth:`zero_grad` drops it."""
        if self.kernel == "triton":
            holders = [(p, self._grad_holder(p)) for g in self.param_groups for p in g["params"]]
            self._prepared = (holders, self._holders_grads(holders), self._prepare())

    def _holders_grads(self, holders: list) -> list:
        return [self._grad32(p) if self._lookups else p.grad for p, _ in holders] + [
            c.grad for _, c in holders if c is not None
        ]

    def _prepared_is_current(self) -> bool:
        """Every gradient tensor is still the one :meth:`prepare_step` read the address of."""
        holders, grads, _ = self._prepared
        return all(map(operator.is_, self._holders_grads(holders), grads))

    def _prepare(self) -> list:
        from nemo_lite.training.fast import adamw_kernel

        out = []
        for key, lists in self._triton_lists(init_state=True).items():
            states = lists["state"]
            steps = [s["step"] for s in states]
            prepared = adamw_kernel.prepare(
                lists["params"],
                lists["grads"] or None,
                [local_shard(s["exp_avg"]) for s in states],
                [local_shard(s["exp_avg_sq"]) for s in states],
                steps,
                copies=lists["copies"] or None,
                bf16_grads=lists["bf16_grads"] or None,
                row_slots=lists["row_slots"] or None,
                float8s=lists["float8s"] or None,
                float8_scales=lists["float8_scales"] or None,
                table=self._kernel_tables.get(key),
            )
            self._kernel_tables[key] = prepared.table
            out.append((key, steps, prepared))
        return out

    def _triton_step(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        for group in self.param_groups:
            if group["maximize"] or group["amsgrad"] or group["differentiable"] or torch.is_tensor(group["lr"]):
                raise ValueError("the triton AdamW kernel supports plain AdamW only (float lr, no maximize/amsgrad)")
        current = self._prepared is not None and self._prepared_is_current()
        ahead, self._prepared = self._prepared, None
        for key, steps, prepared in ahead[2] if current else self._prepare():
            self._launch(key, steps, prepared, grad_scale, found_inf)

    def _launch(self, key: tuple, steps: list[torch.Tensor], prepared, grad_scale=None, found_inf=None) -> None:
        """One launch of the update kernel, for one of :meth:`_prepare`'s entries."""
        from nemo_lite.training.fast import adamw_kernel

        group = self.param_groups[key[0]]
        beta1, beta2 = group["betas"]
        adamw_kernel.launch(
            prepared,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
