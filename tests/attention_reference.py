"""An independent float64 reference for the mask rules and attention, written with plain loops.

Nothing here imports nemo_lite: it restates the mask rules of docs/attention.md so the backends can be checked against
something that does not share their code.
"""

from __future__ import annotations

import math

import torch


def reference_doc_ids(row: list[int], eos_id: int) -> list[int]:
    """A document ends at (and includes) each EOS; what follows the last EOS is one more document."""
    doc, out = 0, []
    for token in row:
        out.append(doc)
        if token == eos_id:
            doc += 1
    return out


def reference_allowed(
    ids_BS: torch.Tensor,
    eos_id: int | None,
    attn_mask_type: str,
    fixed_block_size: int | None = None,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Boolean [B, S, S] (True = query q may read key k), one entry at a time."""
    batch, seq_len = ids_BS.shape
    allowed = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        docs = reference_doc_ids(ids_BS[b].tolist(), eos_id) if attn_mask_type == "block_causal" else None
        for q in range(seq_len):
            for k in range(q + 1):
                ok = True
                if docs is not None:
                    ok = docs[q] == docs[k]
                if fixed_block_size:
                    ok = ok and q // fixed_block_size == k // fixed_block_size
                if sliding_window > 0:
                    ok = ok and q - k <= sliding_window
                allowed[b, q, k] = ok
    return allowed


def reference_attention(q, k, v, allowed_BSS, scale=None, sink_weights=None) -> torch.Tensor:
    """softmax(q k^T * scale, masked; plus one sink logit per head) @ v, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    batch, h_q, seq_len, head_dim = q.shape
    h_kv = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(batch, h_q, seq_len, v.shape[-1], dtype=torch.float64)
    outs = []
    for h in range(h_q):
        kv_head = h // (h_q // h_kv)
        scores = torch.einsum("bqd,bkd->bqk", q[:, h], k[:, kv_head]) * scale
        scores = scores.masked_fill(~allowed_BSS, float("-inf"))
        if sink_weights is not None:
            sink = sink_weights[h].double().expand(batch, seq_len, 1)
            probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("bqk,bkd->bqd", probs, v[:, kv_head]))
    out = torch.stack(outs, dim=1)
    return out
