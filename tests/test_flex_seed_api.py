"""The flex backend keeps the seed's public API, name for name, and fixes what the seed got wrong."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from attention_reference import reference_allowed, reference_attention
from torch.nn.attention.flex_attention import BlockMask, create_mask

from nemo_lite.components.attention import flex_attention
from nemo_lite.components.attention.flex_attention import FLEX_ATTN_MASK_T, FlexAttention

EOS = 0


def ids_with_docs():
    return torch.tensor([[3, 3, 0, 4, 4, 4, 0, 5, 5, 5, 5, 5], [6, 6, 6, 6, 6, 0, 0, 7, 7, 7, 7, 0]])


def dense(mask_mod, batch=2, seq_len=12):
    return create_mask(mask_mod, batch, 1, seq_len, seq_len, device="cpu")[:, 0]


def test_static_mask_mods_follow_the_rules():
    ids = ids_with_docs()
    assert torch.equal(dense(FlexAttention._get_causal_mask_mod(), 1), reference_allowed(ids[:1], None, "causal"))
    block = FlexAttention._get_block_causal_mask_mod(ids, EOS)
    assert torch.equal(dense(block), reference_allowed(ids, EOS, "block_causal"))
    window = FlexAttention._get_sliding_window_mask_mod(3)
    assert torch.equal(dense(window, 1), reference_allowed(ids[:1], None, "causal", sliding_window=3))
    fixed = FlexAttention._fixed_block_mask_mod(block, 5)
    assert torch.equal(dense(fixed), reference_allowed(ids, EOS, "block_causal", fixed_block_size=5))


def test_mask_key_type_is_exported():
    assert FLEX_ATTN_MASK_T is not None
    attn = FlexAttention(attn_mask_type="block_causal", fixed_block_size=None)
    assert ("block_causal", None) in FlexAttention.used_attn_mask_types
    assert attn.attn_mask_type == "block_causal" and attn.fixed_block_size is None


def test_init_attention_mask_is_shared_and_replaced_each_step():
    layers = [FlexAttention(attn_mask_type="block_causal") for _ in range(3)]
    ids = ids_with_docs()
    masks = FlexAttention.init_attention_mask(ids, EOS)
    assert ("block_causal", None) in masks
    assert isinstance(masks[("block_causal", None)], BlockMask)
    q = torch.randn(2, 2, 12, 8)
    with torch.no_grad():
        outs = [layer(q, q, q) for layer in layers]  # no mask argument: the class-level step mask
    ref = reference_attention(q, q, q, reference_allowed(ids, EOS, "block_causal"))
    for out in outs:
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)

    first = FlexAttention.block_masks
    FlexAttention.init_attention_mask(ids.flip(1), EOS)
    assert FlexAttention.block_masks is not first  # replaced, not accumulated
    assert set(FlexAttention.block_masks) == set(first)
    with torch.no_grad():
        out = layers[0](q, q, q)
    ref = reference_attention(q, q, q, reference_allowed(ids.flip(1), EOS, "block_causal"))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_in_forward_composes_with_block_causal():
    layer = FlexAttention(attn_mask_type="block_causal", fixed_block_size=4)
    ids = ids_with_docs()
    FlexAttention.init_attention_mask(ids, EOS)  # built without the window: forward adds it once
    q = torch.randn(2, 2, 12, 8)
    with torch.no_grad():
        out = layer(q, q, q, sliding_window=2)
    ref = reference_attention(q, q, q, reference_allowed(ids, EOS, "block_causal", 4, 2))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert (2, 1, 4) in FlexAttention._step_masks[("block_causal", 4)].masks


def test_sinks_honour_scale():
    layer = FlexAttention()
    q, k, v = torch.randn(3, 1, 4, 10, 8).unbind(0)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        out = layer(q, k, v, scale=0.05, sink_weights=sinks)
    ref = reference_attention(
        q, k, v, reference_allowed(torch.ones(1, 10), None, "causal"), scale=0.05, sink_weights=sinks
    )
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_stored_mask_must_fit_the_batch():
    """A stored block_causal mask describes one batch's documents: another batch must not borrow its rows."""
    layer = FlexAttention(attn_mask_type="block_causal")
    FlexAttention.init_attention_mask(ids_with_docs(), EOS)  # a batch of 2 rows of 12 tokens
    q = torch.randn(1, 2, 12, 8)
    with torch.no_grad(), pytest.raises(ValueError) as info:
        layer(q, q, q)
    message = str(info.value)
    assert "\n" not in message
    assert "is for a batch of shape [2, 12] but q has batch 1 and seq_len 12" in message
    assert "call FlexAttention.init_attention_mask(batch, eos_id) with this batch" in message
    with torch.no_grad(), pytest.raises(ValueError, match=r"\[2, 12\] but q has batch 2 and seq_len 6"):
        layer(torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8))
    FlexAttention.init_attention_mask(ids_with_docs()[:1], EOS)  # re-initialised for the new batch: fine
    with torch.no_grad():
        out = layer(q, q, q)
    ref = reference_attention(q, q, q, reference_allowed(ids_with_docs()[:1], EOS, "block_causal"))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_cpu_training_runs_sdpa_on_the_mask_function_silently(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    layer = FlexAttention(attn_mask_type="block_causal")
    ids = ids_with_docs()
    mask = layer.build_mask(ids, EOS)
    q = torch.randn(2, 2, 12, 8, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing printed into the middle of a progress bar
        for _ in range(3):
            layer(q, q, q, attention_mask=mask).sum().backward()
    dense = mask.masks[("dense", ("block_causal", None))]  # built once for the step, then reused
    assert len(calls) == 3 and all(c is dense for c in calls)
    assert torch.equal(dense[:, 0], reference_allowed(ids, EOS, "block_causal"))

    calls.clear()  # sinks: sdpa has no sink logit, so the math path runs (same function)
    sinks = torch.zeros(2, requires_grad=True)
    out = layer(q, q, q, sink_weights=sinks, attention_mask=mask)
    out.sum().backward()
    assert calls == []
    ref = reference_attention(q, q, q, reference_allowed(ids, EOS, "block_causal"), sink_weights=sinks)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_describe_says_where_flex_runs():
    layer = FlexAttention(attn_mask_type="block_causal")
    assert layer.describe("cpu").startswith("flex: training runs sdpa on the same mask, densely")
    assert "tuned tiles" in layer.describe("cuda")
    assert "torch's default tiles" in FlexAttention(kernel_options="torch").describe("cuda")


@pytest.mark.gpu
def test_gpu_compiles_once_per_process():
    from torch._dynamo.utils import counters

    layer = FlexAttention(attn_mask_type="block_causal")
    ids = ids_with_docs().repeat(1, 32).cuda()  # 384 tokens
    q = torch.randn(2, 4, 384, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(q, q, q, attention_mask=layer.build_mask(ids, EOS)).sum().backward()
    compiled = flex_attention.compiled_flex_attention(), flex_attention.compiled_create_block_mask()
    graphs = counters["stats"]["unique_graphs"]
    other = FlexAttention(attn_mask_type="block_causal")  # another instance, another step's documents
    other(q, q, q, attention_mask=other.build_mask(ids.flip(1), EOS)).sum().backward()
    assert (flex_attention.compiled_flex_attention(), flex_attention.compiled_create_block_mask()) == compiled
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled


def test_the_nemo_automodel_example_of_docs_runs():
    """docs/attention.md's example of the class-level API, run as it is written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "attention.md").read_text()
    section = text.split("## FlexAttention as NeMo AutoModel uses it", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/attention.md", "exec"), scope)
    ids = scope["input_ids"]
    assert scope["masks"] is FlexAttention.block_masks and ("block_causal", None) in scope["masks"]
    assert scope["hidden"].shape == (1, 32, 64) and torch.isfinite(scope["hidden"]).all()
    assert torch.equal(dense(scope["blocks"], 1, 32), reference_allowed(ids, 2, "block_causal", fixed_block_size=16))
    assert torch.equal(dense(scope["window"], 1, 32), reference_allowed(ids, None, "causal", sliding_window=8))
