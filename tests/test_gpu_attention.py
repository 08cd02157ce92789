"""GPU: every backend in bfloat16 against a float32 reference, forward and backward (run on a GPU)."""

from __future__ import annotations

import pytest
import torch

from nemo_lite.components.attention import (
    attention_math,
    dense_mask,
    document_ids,
    get_attention_backend,
    list_attention_backends,
)
from nemo_lite.components.attention.flex_attention import TUNED_KERNEL_OPTIONS

pytestmark = pytest.mark.gpu
EOS = 0


def packed_ids(batch, seq_len, mean_doc, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (batch, seq_len), generator=g)
    eos = torch.rand(batch, seq_len, generator=g) < 1.0 / mean_doc
    ids[eos] = EOS
    ids[0, 0] = EOS  # an EOS at position 0
    ids[0, 1] = EOS  # and two in a row
    return ids.cuda()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("backend_name", list_attention_backends())
@pytest.mark.parametrize(
    "mask_type,fixed,window,sinks",
    [
        ("causal", None, 0, False),
        ("block_causal", None, 0, False),
        ("block_causal", 256, 0, False),
        ("block_causal", None, 200, False),
        ("block_causal", None, 0, True),
        ("causal", None, 100, True),
    ],
)
def test_bf16_matches_float32_reference(backend_name, mask_type, fixed, window, sinks):
    backend_cls = get_attention_backend(backend_name)
    if sinks and not backend_cls.supports_sinks:
        pytest.skip(f"{backend_name} has no sinks (refused with a clear error, tested on CPU)")
    batch, seq_len, h_q, h_kv, head_dim = 2, 1024, 8, 2, 64
    ids = packed_ids(batch, seq_len, mean_doc=150)
    g = torch.Generator(device="cuda").manual_seed(0)
    q32 = torch.randn(batch, h_q, seq_len, head_dim, device="cuda", generator=g)
    k32 = torch.randn(batch, h_kv, seq_len, head_dim, device="cuda", generator=g)
    v32 = torch.randn(batch, h_kv, seq_len, head_dim, device="cuda", generator=g)
    sink32 = torch.randn(h_q, device="cuda", generator=g) if sinks else None
    grad_out = torch.randn(batch, h_q, seq_len, head_dim, device="cuda", generator=g)

    backend = backend_cls(attn_mask_type=mask_type, fixed_block_size=fixed)
    mask = backend.build_mask(ids, EOS, sliding_windows=(window,))
    leaves16 = [t.bfloat16().requires_grad_() for t in (q32, k32, v32)]
    sink16 = sink32.clone().requires_grad_() if sinks else None
    out = backend(*leaves16, sink_weights=sink16, sliding_window=window, enable_gqa=True, attention_mask=mask)
    out.backward(grad_out.bfloat16())

    leaves32 = [t.clone().requires_grad_() for t in (q32, k32, v32)]
    sink_ref = sink32.clone().requires_grad_() if sinks else None
    doc = document_ids(ids, EOS) if mask_type == "block_causal" else None
    allowed = dense_mask(seq_len, doc_ids_BS=doc, fixed_block_size=fixed, sliding_window=window, device="cuda")
    ref = attention_math(*leaves32, allowed, sink_weights=sink_ref, enable_gqa=True)
    ref.backward(grad_out)

    assert rel(out, ref) <= 1e-2
    for name, a, b in zip("qkv", leaves16, leaves32, strict=True):
        assert rel(a.grad, b.grad) <= 1e-2, name
    if sinks:
        assert rel(sink16.grad, sink_ref.grad) <= 1e-2


def test_flex_kernel_options_keep_the_result():
    """Other Triton tiles for the flex kernels (a speed choice, per instance), nemo_lite's tuned ones included,
    compute the same attention."""
    flex = get_attention_backend("flex")
    batch, seq_len, h_q, h_kv, head_dim = 2, 1024, 8, 2, 64
    ids = packed_ids(batch, seq_len, mean_doc=150)
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(batch, h, seq_len, head_dim, device="cuda", generator=g) for h in (h_q, h_kv, h_kv))
    grad_out = torch.randn_like(q)
    tiles = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64}
    results = []
    for options in ("torch", {**tiles, "bwd_BLOCK_N2": 64}, TUNED_KERNEL_OPTIONS[9, 64], "auto"):
        backend = flex(attn_mask_type="block_causal", kernel_options=options)
        mask = backend.build_mask(ids, EOS)
        leaves = [t.bfloat16().requires_grad_() for t in (q, k, v)]
        out = backend(*leaves, enable_gqa=True, attention_mask=mask)
        out.backward(grad_out.bfloat16())
        results.append([out, *(t.grad for t in leaves)])
    for other in results[1:]:
        for a, b in zip(other, results[0], strict=True):
            assert rel(a, b) <= 1e-2


def test_flex_auto_kernel_options_resolve_inside_a_compiled_and_a_checkpointed_model():
    """kernel_options="auto" is resolved from q's card and head_dim inside a compiled forward with no graph
    break (fullgraph), also inside activation checkpointing, where a forward that wrote to the module would
    break the graph and run the checkpointed block uncompiled; the results are the eager forward's."""
    from torch.utils.checkpoint import checkpoint

    flex = get_attention_backend("flex")
    batch, seq_len, heads = 2, 256, 4
    ids = packed_ids(batch, seq_len, mean_doc=60)
    for head_dim in (64, 32):
        backend = flex(attn_mask_type="block_causal")
        mask = backend.build_mask(ids, EOS)
        q = torch.randn(batch, heads, seq_len, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        expected = TUNED_KERNEL_OPTIONS.get((torch.cuda.get_device_capability()[0], head_dim))
        assert backend._kernel_options_for(q) == expected
        with torch.no_grad():
            eager = backend(q, q, q, attention_mask=mask)
        grads = []
        for wrap in (None, checkpoint):
            if wrap is None:
                layer = torch.compile(lambda t, m=mask, b=backend: b(t, t, t, attention_mask=m), fullgraph=True)
            else:
                layer = torch.compile(
                    lambda t, m=mask, b=backend: checkpoint(b, t, t, t, attention_mask=m, use_reentrant=False),
                    fullgraph=True,
                )
            out = layer(q)
            (grad,) = torch.autograd.grad(out.float().square().sum(), q)
            grads.append(grad)
            assert rel(out, eager) <= 1e-2
        assert rel(grads[1], grads[0]) <= 1e-2
    other = flex(attn_mask_type="block_causal", kernel_options="torch")
    assert other._kernel_options_for(q) is None
