"""The fast step: the plain step's arithmetic with fused kernels, module swaps and the update queued early.

Each part checks its own preconditions and the step says in one line which are on and why the others
are off. The AdamW parts run only for an optimizer entry that is AdamW (``adamw_compatible`` in
:mod:`nemo_lite.training.optimizers`); with another one (``optim=muon``) the step builds that optimizer
and updates after the host sync, as the plain step does, and keeps the Triton head loss:

- fused AdamW on the local shards (any GPU, FSDP2 included): the clip and the skip of a non-finite step
  happen inside the kernel (``grad_scale``, ``found_inf``), so the update is queued *before* the host reads
  the step's values; those travel through a pinned buffer on an event recorded before the update, and the
  host goes on to the next batch while the GPU updates;
- the Triton AdamW kernel, one launch for every tensor (one process, triton installed), whose block tables
  also give the gradient norm;
- bf16 weight copies (with the Triton kernel and bf16 autocast): the :class:`CopyLinear` swap, and a copy
  of the output projection that the head loss multiplies by;
- the embedding's gradient as rows (with the weight copies): the :class:`RowsEmbedding` swap;
- float8 weights written by AdamW (with the weight copies, for torchao's tensorwise ``Float8Linear`` layers
  of ``float8.enabled=true``): the :class:`~nemo_lite.training.fast.float8_weights.Float8WeightLinear` swap;
- the Triton head loss (one process, loss not chunked).
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from nemo_lite.training.distributed import local_shard
from nemo_lite.training.fast.optim import FusedAdamW, clip_factor
from nemo_lite.training.fast.swaps import swap_in_lookup_rows, swap_in_weight_copies, swapped_weights
from nemo_lite.training.loss import IGNORE_INDEX, cross_entropy_sum, forward_hidden
from nemo_lite.training.optimizers import (
    OptimSection,
    adamw_kwargs,
    build_optimizer,
    check_optim,
    get_optimizer,
    list_optimizers,
    param_groups,
)
from nemo_lite.training.step import nonfinite_flag, update_after_sync


def fast_step_missing(device: torch.device) -> str | None:
    """What the fast step lacks on ``device`` (None: it can run). On a CPU it runs torch's fused AdamW
    only, with optim=adamw (its Triton parts need CUDA); ``trainer.step_impl=auto`` keeps the plain step there."""
    if device.type not in ("cuda", "cpu"):
        return f"a CUDA device or the CPU (this run is on {device.type})"
    return None


def _float8_weight_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The weights of the float8 layers whose cast the AdamW kernel can do, and of those marked to keep their
    own (none without torchao loaded: a model with torchao's layers has imported it)."""
    if "torchao.float8" not in sys.modules:
        return [], []
    from nemo_lite.training.fast.float8_weights import float8_weight_params

    return float8_weight_params(model)


class FastStep:
    def __init__(
        self,
        model: nn.Module,
        optim: OptimSection,
        *,
        blocks: Sequence[nn.Module] = (),
        device: torch.device,
        distributed: bool,
        autocast_bf16: bool,
        compile: bool = False,
        loss_chunk_size: int = 0,
    ) -> None:
        missing = fast_step_missing(device)
        if missing:
            raise ValueError(f"the fast step needs {missing}")
        entry = check_optim(optim)
        adamw_names = " or ".join(f"optim={n}" for n in list_optimizers() if get_optimizer(n).adamw_compatible)
        not_adamw = "" if entry.adamw_compatible else adamw_names
        triton = "" if importlib.util.find_spec("triton") is not None else "triton"
        if device.type != "cuda":
            triton = "a CUDA device"
        one_process = "one process (FSDP2 shards the weights)" if distributed else ""
        unchunked = "trainer.loss_chunk_size=0" if loss_chunk_size else ""
        needs = {  # part -> what it lacks here ("" = it runs)
            "fused AdamW": not_adamw,
            "Triton AdamW": not_adamw or triton or one_process,
            "bf16 weight copies": not_adamw or triton or one_process or ("" if autocast_bf16 else "bf16 autocast"),
            "Triton loss": triton or one_process or unchunked,
        }
        needs["embedding gradient as rows"] = needs["bf16 weight copies"] and "bf16 weight copies"
        float8_params, own_cast = _float8_weight_params(model)
        if float8_params or own_cast:  # listed only for a model with float8 layers the kernel can write for
            lacks = needs["bf16 weight copies"] and "bf16 weight copies"
            switched_off = "" if float8_params else "float8.weights_from_optimizer=true"
            needs["float8 weights written by AdamW"] = lacks or switched_off
        self.on = {part: not lacks for part, lacks in needs.items()}

        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]  # not the frozen (LoRA base)
        if self.on["fused AdamW"]:
            kernel = "triton" if self.on["Triton AdamW"] else "torch"
            groups = param_groups(model, optim.weight_decay)
            self.optimizer = FusedAdamW(groups, **adamw_kwargs(optim), kernel=kernel)
        else:
            self.optimizer = build_optimizer(model, optim, blocks)
        taken = swapped_weights(
            model, model.output_weight, copies=self.on["bf16 weight copies"], rows=self.on["embedding gradient as rows"]
        )
        float8_on = self.on.get("float8 weights written by AdamW", False)
        taken += float8_params if float8_on else []
        self._refuse_gradient_hooks(model, taken)  # before any module is swapped
        self.copies: dict[torch.Tensor, torch.Tensor] = {}
        if self.on["bf16 weight copies"]:
            self.copies = swap_in_weight_copies(model, model.output_weight)
            self.optimizer.keep_weight_copies(list(self.copies.items()))
        self.float8: dict[torch.Tensor, torch.Tensor] = {}  # parameter -> its float8 weight
        if float8_on:
            from nemo_lite.training.fast.float8_weights import swap_in_float8_weights

            self.float8 = swap_in_float8_weights(model)
            self.optimizer.keep_float8_weights(list(self.float8.items()))
        self.rows = swap_in_lookup_rows(model) if self.on["embedding gradient as rows"] else {}
        for param, lookups in self.rows.items():
            self.optimizer.keep_lookup_gradient(param, lookups)
        self.output_copy = self.copies.get(model.output_weight)
        self.loss_kw = {"chunk_tokens": loss_chunk_size, "compiled": compile}
        self._host_values: torch.Tensor | None = None
        self._weights_bad: torch.Tensor | None = None
        on = ", ".join(p for p, ok in self.on.items() if ok and p != "fused AdamW")
        off = "; ".join(f"{p} (needs {lacks})" for p, lacks in needs.items() if lacks)
        if self.on["fused AdamW"]:
            head = f"fast step: fused AdamW ({'on local shards, ' if distributed else ''}{device.type})"
        else:
            head = f"fast step: {entry.summary}, updated after the host sync"
        self.description = head + (f", {on}" if on else "") + (f"; off: {off}" if off else "")

    @staticmethod
    def _refuse_gradient_hooks(model: nn.Module, swapped: list[torch.Tensor]) -> None:
        """A swapped parameter's gradient never reaches ``.grad``, so hooks on it would never run."""
        ids = {id(p) for p in swapped}
        hooked = [
            name
            for name, p in model.named_parameters()
            if id(p) in ids and (p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None))
        ]
        if hooked:
            raise ValueError(
                f"the fast step keeps the gradients of {', '.join(hooked)} off .grad (bf16 weight copies, lookup "
                "rows), so their gradient hooks would never run; use trainer.step_impl=plain"
            )

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], mask: Any, grad_scale: Any = None):
        hidden_BSH, weight_VH = forward_hidden(model, batch, mask), model.output_weight
        autocast = torch.is_autocast_enabled(self.device.type)
        if self.output_copy is not None and autocast:
            weight_VH = self.output_copy
        if not self.on["Triton loss"]:
            return cross_entropy_sum(hidden_BSH, weight_VH, batch["labels"], **self.loss_kw)
        from nemo_lite.training.fast.cross_entropy_kernel import linear_cross_entropy_sum

        if autocast:  # the projection in the dtype autocast would run it in
            dtype = torch.get_autocast_dtype(self.device.type)
            hidden_BSH, weight_VH = hidden_BSH.to(dtype), weight_VH.to(dtype)
        if grad_scale is not None and not torch.is_tensor(grad_scale):
            grad_scale = torch.full((), grad_scale, dtype=torch.float32, device=self.device)
        hidden_TH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1])
        labels_T = batch["labels"].reshape(-1)
        return linear_cross_entropy_sum(hidden_TH, weight_VH, labels_T, grad_scale, ignore_index=IGNORE_INDEX)

    def grad_norm(self) -> torch.Tensor:
        if self.on["Triton AdamW"]:
            self.optimizer.prepare_step()  # the update's host work now; the norm reads its tables
            return self.optimizer.grad_norm()
        return torch.nn.utils.get_total_norm([local_shard(p.grad) for p in self.params if p.grad is not None])

    def apply(self, report: torch.Tensor, grad_norm: torch.Tensor, clip: float) -> list[float]:
        if not self.on["fused AdamW"]:
            values, stepped = update_after_sync(self.optimizer, self.params, report, grad_norm, clip)
            if stepped:
                self._weights_bad = nonfinite_flag(self.params)
            return values
        # The update is queued before the host reads anything: a non-finite step is skipped inside the
        # kernel, and the values reach the host on an event recorded before the update, so the host waits
        # only for them and goes on to the next batch, its mask and its forward while the GPU updates.
        found_inf = (~(torch.isfinite(report[0]) & torch.isfinite(report[1]))).float()
        values, ready = self._to_host(report)
        self.optimizer.step(grad_scale=clip_factor(grad_norm, clip) if clip > 0 else None, found_inf=found_inf)
        self._weights_bad = nonfinite_flag(self.params)  # queued behind the update; read with the next step
        if ready is not None:
            ready.synchronize()
        self.optimizer.zero_grad(set_to_none=True)
        return values.tolist()

    def _to_host(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """``values`` copied into a reused pinned host buffer without blocking, and the event that says the
        copy is done (None on a CPU, where the copy is done on return)."""
        if values.device.type != "cuda":
            return values.clone(), None
        if self._host_values is None or self._host_values.shape != values.shape:
            self._host_values = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self._host_values.copy_(values, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return self._host_values, ready

    def weights_changed(self) -> None:
        if self.copies or self.float8:
            self.optimizer.refresh_weight_copies()
        self._weights_bad = nonfinite_flag(self.params)

    def nonfinite_weights(self) -> torch.Tensor:
        if self._weights_bad is None:
            self._weights_bad = nonfinite_flag(self.params)
        return self._weights_bad
