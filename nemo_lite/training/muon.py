"""Muon for the decoder blocks' matrices and AdamW for the rest, as one optimizer (the ``muon`` entry of
:mod:`nemo_lite.training.optimizers`).

:class:`ShardedMuon` is torch's ``torch.optim.Muon`` whose step also takes FSDP2's parameters: each rank
holds a dim-0 shard (a DTensor) of every matrix, while the Newton–Schulz iteration needs the whole matrix.
The momentum, an elementwise update, runs on the local shards; the momentum-updated gradient is
all-gathered, orthogonalized on every rank, and each rank keeps its own rows. On plain tensors the step
is torch's, operation for operation.

:class:`MuonWithAdamW` holds a :class:`ShardedMuon` and an AdamW and shows their parameter groups and
state as its own, so the schedule, ``state_dict`` and ``torch.distributed.checkpoint`` see one optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.optim import _muon


def orthogonalize(update: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """torch's Newton–Schulz iteration of ``update`` with ``group``'s settings (bf16, like torch's)."""
    # Newer torch takes a use_addmm flag, and its groups then carry it.
    extra = (group["use_addmm"],) if "use_addmm" in group else ()
    return _muon._zeropower_via_newtonschulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], *extra)


def _whole(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The full matrix of which ``local`` is this rank's part, laid out as the DTensor ``like``."""
    if not isinstance(like, DTensor):
        return local
    return DTensor.from_local(
        local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    ).full_tensor()


def _own_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` under the DTensor ``like``'s placements (no communication)."""
    if not isinstance(like, DTensor):
        return full
    replicated = DTensor.from_local(full, like.device_mesh, [Replicate()] * like.device_mesh.ndim, run_check=False)
    return replicated.redistribute(like.device_mesh, like.placements).to_local()


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's part on this rank (under no_grad, a view of its storage); any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class ShardedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` that also updates DTensor (FSDP2-sharded) matrices correctly."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            lr = lr.item() if torch.is_tensor(lr) else lr
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad, memory_format=torch.preserve_format)
                grad, buf = local_shard(param.grad), local_shard(state["momentum_buffer"])
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = _own_part(orthogonalize(_whole(update, param), group), param)
                weight = local_shard(param)
                weight.mul_(1 - lr * weight_decay)
                weight.add_(update, alpha=-_muon._adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on ``matrices`` (step size matched to AdamW's update RMS), AdamW on ``adamw_groups``. The
    groups are the parts' own group dicts (Muon's first), so the lr schedule reaches both parts."""

    def __init__(
        self,
        matrices: Sequence[torch.Tensor],
        adamw_groups: list[dict[str, Any]],
        *,
        lr: float,
        weight_decay: float,
        adamw_betas: tuple[float, float],
        adamw_eps: float,
        momentum: float,
        nesterov: bool,
        ns_steps: int,
    ) -> None:
        self.muon = ShardedMuon(
            list(matrices),
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn="match_rms_adamw",
        )
        self.adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=adamw_betas, eps=adamw_eps)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._share_groups_and_state()

    def _share_groups_and_state(self) -> None:
        """Point the parts at this optimizer's group dicts and state (loading a state dict replaces both)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        kinds = ["muon" if "ns_steps" in g else "adamw" for g in groups]
        n = len(self.muon.param_groups)
        if kinds != ["muon"] * n + ["adamw"] * (len(self.param_groups) - n):
            raise ValueError(f"not a state dict of Muon with AdamW (its groups: {', '.join(kinds)})")
        super().load_state_dict(state_dict)
        self._share_groups_and_state()
        # AdamW's step counts stay on the host (torch's non-fused layout), as AdamW's own loading keeps them.
        for group in self.adamw.param_groups:
            for param in group["params"]:
                state = self.state.get(param, {})
                if "step" in state and not (group["fused"] or group["capturable"]):
                    state["step"] = state["step"].to(device="cpu", dtype=torch.float32)
