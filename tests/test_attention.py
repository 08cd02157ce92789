"""Every attention backend against the float64 reference: forward, gradients, no cross-document leak."""

from __future__ import annotations

import pytest
import torch
from attention_reference import reference_allowed, reference_attention, reference_doc_ids

from nemo_lite.components.attention import (
    AttentionBackend,
    document_ids,
    get_attention_backend,
    list_attention_backends,
)
from nemo_lite.components.attention.flex_attention import FlexAttention

EOS = 0
BACKENDS = list_attention_backends()


def make_ids(rows: list[list[int]]) -> torch.Tensor:
    """Rows given as lists of token ids; 0 is EOS, other values are ordinary tokens."""
    return torch.tensor(rows, dtype=torch.long)


def packed_rows(seq_len: int = 24) -> torch.Tensor:
    """Two rows covering the edge cases of the document rule."""
    row0 = [0] + [5] * 6 + [0, 0] + [7] * 9 + [0] + [3] * (seq_len - 19)  # EOS first, two in a row
    row1 = [4] * (seq_len - 1) + [0]  # one document ending on the last position
    return make_ids([row0, row1])


def no_eos_rows(seq_len: int = 24) -> torch.Tensor:
    return make_ids([[9] * seq_len, [2] * 10 + [0] + [8] * (seq_len - 11)])


def qkv(batch, seq_len, h_q=8, h_kv=2, head_dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape_q, shape_kv = (batch, h_q, seq_len, head_dim), (batch, h_kv, seq_len, head_dim)
    q = torch.randn(shape_q, generator=g, dtype=dtype)
    k = torch.randn(shape_kv, generator=g, dtype=dtype)
    v = torch.randn(shape_kv, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


CASES = {
    # name: (ids builder, attn_mask_type, fixed_block_size, sliding_window, sinks, scale, h_q, h_kv)
    "causal": (packed_rows, "causal", None, 0, False, None, 4, 4),
    "block_causal": (packed_rows, "block_causal", None, 0, False, None, 4, 4),
    "block_causal_no_eos_rows": (no_eos_rows, "block_causal", None, 0, False, None, 4, 4),
    "fixed_blocks_cross_docs": (packed_rows, "block_causal", 5, 0, False, None, 4, 4),
    "fixed_blocks_causal": (packed_rows, "causal", 7, 0, False, None, 4, 4),
    "sliding_window": (packed_rows, "causal", None, 3, False, None, 4, 4),
    "sliding_window_block_causal": (packed_rows, "block_causal", None, 4, False, None, 4, 4),
    "window_blocks_docs": (packed_rows, "block_causal", 8, 2, False, None, 4, 4),
    "sinks_causal": (packed_rows, "causal", None, 0, True, None, 4, 4),
    "sinks_block_causal_scale": (packed_rows, "block_causal", None, 0, True, 0.37, 4, 4),
    "custom_scale": (packed_rows, "block_causal", None, 0, False, 0.11, 4, 4),
    "gqa_8_2": (packed_rows, "block_causal", None, 0, False, None, 8, 2),
    "gqa_sinks_window": (packed_rows, "block_causal", 6, 3, True, 0.2, 8, 2),
    "mqa_causal": (packed_rows, "causal", None, 0, False, None, 4, 1),
}


def run_case(backend_name: str, case: str, dtype=torch.float32):
    build_ids, mask_type, block, window, use_sinks, scale, h_q, h_kv = CASES[case]
    ids = build_ids()
    batch, seq_len = ids.shape
    q, k, v = qkv(batch, seq_len, h_q, h_kv, dtype=dtype)
    sinks = (
        torch.randn(h_q, generator=torch.Generator().manual_seed(1), dtype=dtype).requires_grad_()
        if use_sinks
        else None
    )
    backend = get_attention_backend(backend_name)(attn_mask_type=mask_type, fixed_block_size=block)
    mask = backend.build_mask(ids, EOS, sliding_windows=(window,))
    out = backend(
        q,
        k,
        v,
        scale=scale,
        sink_weights=sinks,
        sliding_window=window,
        enable_gqa=h_q != h_kv,
        attention_mask=mask,
    )
    allowed = reference_allowed(ids, EOS, mask_type, block, window)
    ref = reference_attention(q, k, v, allowed, scale=scale, sink_weights=sinks)
    return (q, k, v, sinks), out, ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backend_matches_float64_reference(backend_name, case):
    if CASES[case][4] and not get_attention_backend(backend_name).supports_sinks:
        with pytest.raises(NotImplementedError, match="backends that do: eager, flex, sdpa"):
            run_case(backend_name, case)
        return
    inputs, out, ref = run_case(backend_name, case)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    grad_out = torch.randn_like(ref)
    tensors = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(out, tensors, grad_out.float())
    grads_ref = torch.autograd.grad(ref, tensors, grad_out)
    for name, g, g_ref in zip("qkvs", grads, grads_ref, strict=False):
        assert rel_err(g, g_ref) <= 1e-5, f"gradient of {name}"


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_inference_path_matches_reference(backend_name):
    """Under no_grad flex runs torch's own kernel on CPU (no dense fallback): same function."""
    for case in ("block_causal", "window_blocks_docs", "gqa_sinks_window"):
        if CASES[case][4] and not get_attention_backend(backend_name).supports_sinks:
            continue
        with torch.no_grad():
            _, out, ref = run_case(backend_name, case)
        assert rel_err(out, ref) <= 1e-5, case


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_no_gradient_leaks_between_documents(backend_name):
    ids = packed_rows()
    batch, seq_len = ids.shape
    q, k, v = qkv(batch, seq_len, 8, 2)
    backend = get_attention_backend(backend_name)(attn_mask_type="block_causal")
    sinks = torch.zeros(8, requires_grad=True) if backend.supports_sinks else None
    mask = backend.build_mask(ids, EOS)
    out = backend(q, k, v, sink_weights=sinks, enable_gqa=True, attention_mask=mask)
    for b in range(batch):
        docs = torch.tensor(reference_doc_ids(ids[b].tolist(), EOS))
        for doc in docs.unique():
            inside = docs == doc
            grads = torch.autograd.grad(out[b, :, inside].sum(), (q, k, v), retain_graph=True)
            for g in grads:
                assert torch.count_nonzero(g[b][:, ~inside]) == 0  # other documents of this row
                others = [r for r in range(batch) if r != b]
                assert torch.count_nonzero(g[others]) == 0  # other rows
            # the test can see a leak: this document's own values do receive gradient
            assert torch.count_nonzero(grads[2][b][:, inside]) > 0


def test_document_ids_follow_the_eos_rule():
    ids = make_ids([[0, 5, 5, 0, 0, 7, 7], [7, 7, 7, 7, 7, 7, 0], [7, 7, 7, 7, 7, 7, 7]])
    expected = [reference_doc_ids(row, EOS) for row in ids.tolist()]
    assert document_ids(ids, EOS).tolist() == expected
    assert expected[0] == [0, 1, 1, 1, 2, 3, 3]


def test_fixed_blocks_read_global_positions():
    """The reference implementation's `q % n` bug would change this case: keep it meaningful."""
    ids = packed_rows()
    correct = reference_allowed(ids, EOS, "block_causal", fixed_block_size=5)
    docs = torch.tensor([reference_doc_ids(r, EOS) for r in ids.tolist()])
    n, seq_len = 5, ids.shape[1]
    buggy = torch.zeros_like(correct)
    for b in range(ids.shape[0]):
        for q in range(seq_len):
            for k in range(seq_len):
                qm, km = q % n, k % n
                buggy[b, q, k] = q // n == k // n and km <= qm and bool(docs[b, qm] == docs[b, km])
    assert not torch.equal(correct, buggy)
    backend = get_attention_backend("flex")(attn_mask_type="block_causal", fixed_block_size=5)
    q, k, v = qkv(*ids.shape, 4, 4)
    with torch.no_grad():
        out = backend(q, k, v, attention_mask=backend.build_mask(ids, EOS))
        ref = reference_attention(q, k, v, correct)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_gqa_requires_opt_in_and_divisible_heads(backend_name):
    backend = get_attention_backend(backend_name)()
    q, k, v = qkv(1, 8, 6, 4)
    with pytest.raises(ValueError, match="Hq % Hkv"):
        backend(q, k, v, enable_gqa=True)
    q, k, v = qkv(1, 8, 8, 2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        backend(q, k, v)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_block_causal_without_a_step_mask_is_an_error(backend_name):
    backend = get_attention_backend(backend_name)(attn_mask_type="block_causal")
    if isinstance(backend, FlexAttention):
        FlexAttention._step_masks = {}
    q, k, v = qkv(1, 8, 2, 2)
    with pytest.raises(ValueError, match="build_mask"):
        backend(q, k, v)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_mask_of_another_batch_is_refused(backend_name):
    backend = get_attention_backend(backend_name)(attn_mask_type="block_causal")
    mask = backend.build_mask(packed_rows(), EOS)  # two rows
    q, k, v = qkv(1, 24, 2, 2)
    with pytest.raises(ValueError, match="attention_mask is for batch_size=2, q has 1"):
        backend(q, k, v, attention_mask=mask)


def test_flex_cpu_training_equals_sdpa_with_the_dense_mask():
    """Without a flex backward on CPU, flex trains through sdpa on the same dense mask: the same numbers."""
    ids = packed_rows()
    outs = []
    for name in ("flex", "sdpa"):
        backend = get_attention_backend(name)(attn_mask_type="block_causal", fixed_block_size=7)
        q, k, v = qkv(*ids.shape, 8, 2)
        out = backend(q, k, v, sliding_window=3, enable_gqa=True, attention_mask=backend.build_mask(ids, EOS))
        outs.append([out, *torch.autograd.grad(out.square().sum(), (q, k, v))])
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_mask_of_another_backend_is_refused():
    ids = packed_rows()
    mask = get_attention_backend("eager")(attn_mask_type="block_causal").build_mask(ids, EOS)
    q, k, v = qkv(*ids.shape, 2, 2)
    with pytest.raises(ValueError, match="built by backend 'eager'"):
        get_attention_backend("sdpa")(attn_mask_type="block_causal")(q, k, v, attention_mask=mask)


def test_bad_mask_config_lists_valid_choices():
    with pytest.raises(ValueError, match=r"\['causal', 'block_causal', 'shared_prompt'\]"):
        get_attention_backend("sdpa")(attn_mask_type="sliding")
    with pytest.raises(ValueError, match="fixed_block_size"):
        get_attention_backend("sdpa")(fixed_block_size=0)
    with pytest.raises(ValueError, match="eos_id"):
        get_attention_backend("sdpa")(attn_mask_type="block_causal").build_mask(packed_rows(), None)


def test_sdpa_pure_causal_uses_is_causal(monkeypatch):
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    backend = get_attention_backend("sdpa")()
    q, k, v = qkv(2, 24, 4, 2)
    mask = backend.build_mask(torch.ones(2, 24, dtype=torch.long), EOS)
    backend(q, k, v, enable_gqa=True, attention_mask=mask)
    assert calls == [(None, True)]
    calls.clear()
    backend = get_attention_backend("sdpa")(attn_mask_type="block_causal")
    backend(q, k, v, enable_gqa=True, attention_mask=backend.build_mask(packed_rows(), EOS))
    assert calls[0][0] is not None and calls[0][1] is False


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_backends_are_parameter_free_modules(backend_name):
    backend = get_attention_backend(backend_name)()
    assert isinstance(backend, AttentionBackend)
    assert list(backend.parameters()) == []
