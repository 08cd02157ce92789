"""The fast step's module swaps, applied to a built model after FSDP2 (unlike the model converters of
:mod:`nemo_lite.training.converters`, which change the model before compile); the model files never know
about them.

- :class:`CopyLinear` replaces ``nn.Linear``: under autocast it multiplies by a bf16 copy of its weight
  that the Triton AdamW kernel rewrites after every update, so the gradient arrives as bf16 on the copy.
  The values are autocast's (its cast rounds the same way, and its gradient is the bf16 one upcast),
  without casting every weight down and every weight gradient up each step.
- :class:`RowsEmbedding` replaces ``nn.Embedding``: its float32 gradient is kept as one row per looked-up
  token (:mod:`nemo_lite.training.fast.lookup_gradient`) for the kernel to read, not as a dense matrix.

Both keep the original parameter objects, so parameter names, state dicts, checkpoints and exports do
not change. The float32 weights stay the parameters; a swapped parameter's ``.grad`` stays None, since
its gradient lives on the copy or in the rows (``nemo_lite.testing.step.dense_gradients`` materializes them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemo_lite.training.fast.lookup_gradient import LookupGradient, lookup


def bf16_copy(weight: torch.Tensor) -> torch.Tensor:
    """An empty bf16 leaf shaped like ``weight`` that collects its own gradient (filled by the optimizer)."""
    return torch.empty_like(weight, dtype=torch.bfloat16).requires_grad_()


class CopyLinear(nn.Linear):
    """``nn.Linear`` that multiplies by ``weight_copy`` (bf16) under autocast and by ``weight`` otherwise."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight_copy = bf16_copy(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            return F.linear(x, self.weight_copy, self.bias)
        return F.linear(x, self.weight, self.bias)


class RowsEmbedding(nn.Embedding):
    """``nn.Embedding`` whose weight gradient goes to ``self.lookups`` as rows instead of ``weight.grad``."""

    def __init__(self, embedding: nn.Embedding) -> None:
        nn.Module.__init__(self)
        for name in ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type"):
            setattr(self, name, getattr(embedding, name))
        self.scale_grad_by_freq, self.sparse = embedding.scale_grad_by_freq, embedding.sparse
        if self.max_norm is not None or self.scale_grad_by_freq or self.sparse:
            raise ValueError("lookup rows support a plain embedding (no max_norm, frequency scaling, sparse gradient)")
        self.weight = embedding.weight
        self.lookups = LookupGradient(embedding.weight, self.padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self.weight, ids, self.lookups)


def _swappable(model: nn.Module, cls: type[nn.Module]) -> list[nn.Module]:
    """The ``cls`` modules (exact type) with a trainable weight, each once."""
    found = {id(m): m for m in model.modules() if type(m) is cls and m.weight.requires_grad}
    return list(found.values())


def swapped_weights(model: nn.Module, output_weight: torch.Tensor, *, copies: bool, rows: bool) -> list[torch.Tensor]:
    """The parameters that :func:`swap_in_weight_copies` / :func:`swap_in_lookup_rows` would take over."""
    out = [m.weight for m in _swappable(model, nn.Linear)] if copies else []
    if copies and output_weight.requires_grad:
        out.append(output_weight)
    return out + ([m.weight for m in _swappable(model, nn.Embedding)] if rows else [])


def _swap(model: nn.Module, old_cls: type[nn.Module], make) -> list[nn.Module]:
    """Replace every ``old_cls`` module (exact type, trainable weight) by ``make(module)``; returns the new ones."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is old_cls and child.weight.requires_grad:
                new = make(child)
                setattr(parent, name, new)
                swapped.append(new)
    return swapped


def swap_in_weight_copies(model: nn.Module, output_weight: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """Give every trainable ``nn.Linear`` a bf16 weight copy (a :class:`CopyLinear` swap), and the output
    projection's weight one too (the embedding matrix when tied). Returns ``{parameter: copy}``."""
    copies = {m.weight: m.weight_copy for m in _swap(model, nn.Linear, CopyLinear)}
    if output_weight.requires_grad and output_weight not in copies:
        copies[output_weight] = bf16_copy(output_weight)
    return copies


def swap_in_lookup_rows(model: nn.Module) -> dict[torch.Tensor, LookupGradient]:
    """Keep every trainable embedding's gradient as rows (a :class:`RowsEmbedding` swap). Returns
    ``{parameter: its rows}``."""
    return {m.weight: m.lookups for m in _swap(model, nn.Embedding, RowsEmbedding)}
