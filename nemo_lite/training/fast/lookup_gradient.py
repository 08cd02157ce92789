"""An embedding lookup whose float32 gradient is kept as rows, one per distinct token, not as a dense matrix.

The dense gradient of a 128k x 2048 embedding is a 1 GB float32 matrix that is zeroed every step, written
in the few thousand rows a step looks up, and then read in full by the gradient norm and the update. Here
the lookup's backward keeps the looked-up ids and their output gradients; :meth:`LookupGradient.rows`
reduces them, in a fixed order, to ``rows`` (``[n, hidden]`` float32, one row per distinct id, the
rest unused) and ``row_slot`` (``[vocab]`` int32: the row of ``rows`` that holds a token's gradient,
-1 for a token the step did not look up). The Triton AdamW kernel reads that pair where it would read
the dense gradient (:mod:`nemo_lite.training.fast.adamw_kernel`), so the values it sees are the dense
gradient's: the lookup's rows summed in float32 (by torch's deterministic ``embedding_dense_backward``,
over ``n`` rows instead of ``vocab``), zero elsewhere.

The fast step uses it with the bf16 weight copies (:class:`nemo_lite.training.fast.swaps.RowsEmbedding`),
where the embedding's other gradient, the tied output projection's, arrives as bf16 on its copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class LookupGradient:
    """The float32 gradient of one embedding matrix's lookups since the last :meth:`clear`."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"a lookup gradient is for a 2-d embedding matrix; got shape {tuple(weight.shape)}")
        self.shape = tuple(weight.shape)
        self.padding_idx = padding_idx  # as nn.Embedding's: this token's lookups add nothing
        self.device = weight.device
        self._ids: list[torch.Tensor] = []
        self._grads: list[torch.Tensor] = []
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def __bool__(self) -> bool:
        """Whether any lookup's gradient arrived since the last :meth:`clear`."""
        return bool(self._ids)

    def add(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """One lookup's ids (any shape) and the gradient of its output (``ids.shape + (hidden,)``)."""
        if grad.shape != (*ids.shape, self.shape[1]):
            raise ValueError(f"a lookup of ids {tuple(ids.shape)} needs a gradient of {(*ids.shape, self.shape[1])}")
        ids, grad = ids.reshape(-1), grad.reshape(-1, self.shape[1]).float()
        if self.padding_idx is not None:
            grad = grad.masked_fill((ids == self.padding_idx)[:, None], 0.0)
        self._ids.append(ids)
        self._grads.append(grad)
        self._rows = None

    def clear(self) -> None:
        self._ids, self._grads, self._rows = [], [], None

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_slot, rows)``, reduced once per set of lookups (no host sync): ``rows[row_slot[t]]`` is
        token ``t``'s gradient where ``row_slot[t] >= 0``."""
        if not self._ids:
            raise ValueError("no lookup gradient arrived since the last clear()")
        if self._rows is None:
            ids = self._ids[0] if len(self._ids) == 1 else torch.cat(self._ids)
            grads = self._grads[0] if len(self._grads) == 1 else torch.cat(self._grads)
            n = ids.numel()
            sorted_ids, order = torch.sort(ids, stable=True)
            first = torch.ones(n, dtype=torch.bool, device=ids.device)
            first[1:] = sorted_ids[1:] != sorted_ids[:-1]
            slot_sorted = torch.cumsum(first, 0) - 1  # each distinct id's row, in the order of the ids
            slot = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)  # per lookup position
            rows = torch.ops.aten.embedding_dense_backward(grads, slot, n, -1, False)
            row_slot = torch.full((self.shape[0],), -1, dtype=torch.int32, device=ids.device)
            row_slot[sorted_ids] = slot_sorted.to(torch.int32)  # repeated ids write the same row
            self._rows = (row_slot, rows)
        return self._rows

    def dense(self) -> torch.Tensor:
        """The same gradient as a dense float32 matrix (for tests and for callers without the kernel)."""
        row_slot, rows = self.rows()
        hit = row_slot >= 0
        out = torch.zeros(self.shape, dtype=torch.float32, device=rows.device)
        out[hit] = rows[row_slot[hit].long()]
        return out


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight_VH, ids, sink):
        ctx.sink = sink
        ctx.save_for_backward(ids)
        return F.embedding(ids, weight_VH)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ctx.sink.add(ids, grad_out)
        return None, None, None  # the weight's gradient went to the sink, not to weight.grad


def lookup(weight_VH: torch.Tensor, ids: torch.Tensor, sink: LookupGradient) -> torch.Tensor:
    """``F.embedding(ids, weight)``, whose gradient for ``weight`` goes to ``sink`` instead of ``weight.grad``."""
    return _Lookup.apply(weight_VH, ids, sink)
