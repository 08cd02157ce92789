"""The varlen backend's cu_seqlens builder on the edge cases of the mask rules (its math is covered by
the shared reference tests in test_attention.py, through the dense fallback on CPU)."""

from __future__ import annotations

import pytest
import torch
from attention_reference import reference_allowed, reference_attention

from nemo_lite.components.attention import get_attention_backend
from nemo_lite.components.attention.varlen import build_cu_seqlens

EOS = 0


def cu(ids, mask_type="block_causal", fixed=None):
    backend = get_attention_backend("varlen")(attn_mask_type=mask_type, fixed_block_size=fixed)
    mask = backend.build_mask(torch.tensor(ids), EOS)
    cu_seqlens, max_len, _ = build_cu_seqlens(mask)
    assert cu_seqlens.dtype == torch.int32
    return cu_seqlens.tolist(), max_len


def test_eos_first_last_and_doubled():
    assert cu([[0, 5, 5, 0, 0, 7, 7, 7]]) == ([0, 1, 4, 5, 8], 3)
    assert cu([[5, 5, 5, 0]]) == ([0, 4], 4)  # EOS at the end: one document, no empty segment after it
    assert cu([[5, 5, 5, 5]]) == ([0, 4], 4)  # no EOS: one document


def test_rows_are_separate_segments():
    assert cu([[5, 0, 5, 5], [5, 5, 5, 5]]) == ([0, 2, 4, 8], 4)
    assert cu([[5, 0, 5, 5], [5, 5, 5, 5]], mask_type="causal") == ([0, 4, 8], 4)


def test_fixed_blocks_add_cuts():
    assert cu([[5, 5, 0, 5, 5, 5, 5, 5]], fixed=3) == ([0, 3, 6, 8], 3)
    assert cu([[5, 0, 5, 5, 5, 5, 5, 5]], fixed=4) == ([0, 2, 4, 8], 4)
    assert cu([[5, 5, 5, 5, 5, 5]], mask_type="causal", fixed=4) == ([0, 4, 6], 4)


def test_segments_are_built_once_per_step():
    backend = get_attention_backend("varlen")(attn_mask_type="block_causal")
    mask = backend.build_mask(torch.tensor([[5, 0, 5, 5, 5, 0, 5, 5]]), EOS, sliding_windows=(0, 2))
    a, b = mask.masks.values()
    assert a.cu_seqlens is b.cu_seqlens and (a.sliding_window, b.sliding_window) == (0, 2)


def test_sinks_are_refused_by_name():
    backend = get_attention_backend("varlen")()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(NotImplementedError, match="flex"):
        backend(q, q, q, sink_weights=torch.zeros(2))


def test_cpu_fallback_matches_reference_with_window():
    ids = torch.tensor([[5, 5, 5, 0, 5, 5, 5, 5, 5, 0, 5, 5]])
    backend = get_attention_backend("varlen")(attn_mask_type="block_causal", fixed_block_size=5)
    q = torch.randn(1, 4, 12, 8)
    k, v = torch.randn(2, 1, 2, 12, 8).unbind(0)
    out = backend(q, k, v, sliding_window=2, enable_gqa=True, attention_mask=backend.build_mask(ids, EOS))
    ref = reference_attention(q, k, v, reference_allowed(ids, EOS, "block_causal", 5, 2))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixed", [None, 3])
def test_sync_free_segments_are_the_same_segments(fixed):
    ids = torch.tensor([[0, 5, 5, 0, 0, 7, 7, 7], [5, 5, 5, 5, 5, 5, 5, 0]])
    backend = get_attention_backend("varlen")(attn_mask_type="block_causal", fixed_block_size=fixed)
    mask = backend.build_mask(ids, EOS)
    exact, exact_max, seg = build_cu_seqlens(mask, host_sync=True)
    padded, bound, seg_padded = build_cu_seqlens(mask, host_sync=False)
    assert padded.shape == (ids.numel() + 1,) and padded.dtype == torch.int32
    n = exact.numel()
    assert torch.equal(padded[:n], exact)  # the real boundaries first
    assert (padded[n:] == ids.numel()).all()  # then empty segments at the end
    assert bound >= exact_max and torch.equal(seg, seg_padded)


def test_sync_free_backend_matches_reference_on_cpu():
    ids = torch.tensor([[5, 5, 5, 0, 5, 5, 5, 5, 5, 0, 5, 5]])
    backend = get_attention_backend("varlen")(attn_mask_type="block_causal", host_sync=False)
    q = torch.randn(1, 2, 12, 8)
    out = backend(q, q, q, attention_mask=backend.build_mask(ids, EOS))
    ref = reference_attention(q, q, q, reference_allowed(ids, EOS, "block_causal"))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
