"""Property-based: random EOS layouts, windows, fixed blocks and GQA shapes. Every backend agrees with
the float64 reference, and no query ever reads another document."""

from __future__ import annotations

import torch
from attention_reference import reference_allowed, reference_attention, reference_doc_ids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nemo_lite.components.attention import get_attention_backend, list_attention_backends

EOS = 0


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 3))
    seq_len = draw(st.integers(1, 40))
    eos_prob = draw(st.sampled_from([0.0, 0.05, 0.2, 0.6, 1.0]))
    rows = [[EOS if draw(st.floats(0, 1)) < eos_prob else 7 for _ in range(seq_len)] for _ in range(batch)]
    h_kv = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 4]))
    return {
        "ids": torch.tensor(rows),
        "mask_type": draw(st.sampled_from(["causal", "block_causal"])),
        "fixed": draw(st.one_of(st.none(), st.integers(1, 16))),
        "window": draw(st.sampled_from([0, 0, 1, 3, 9])),
        "h_kv": h_kv,
        "h_q": h_kv * groups,
        "head_dim": draw(st.sampled_from([4, 8])),
        "sinks": draw(st.booleans()),
        "scale": draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        "seed": draw(st.integers(0, 2**16)),
    }


# A counter the docs quote: how many random cases the suite checks per backend.
N_EXAMPLES = 60


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_layouts_match_reference_and_never_leak(case):
    ids = case["ids"]
    batch, seq_len = ids.shape
    g = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(batch, case["h_q"], seq_len, case["head_dim"], generator=g)
    k = torch.randn(batch, case["h_kv"], seq_len, case["head_dim"], generator=g)
    v = torch.randn(batch, case["h_kv"], seq_len, case["head_dim"], generator=g)
    sinks = torch.randn(case["h_q"], generator=g) if case["sinks"] else None
    allowed = reference_allowed(ids, EOS, case["mask_type"], case["fixed"], case["window"])
    if case["mask_type"] == "block_causal":  # the reference itself: no pair crosses a document
        docs = torch.tensor([reference_doc_ids(r, EOS) for r in ids.tolist()])
        assert not (allowed & (docs[:, :, None] != docs[:, None, :])).any()
    ref = reference_attention(q, k, v, allowed, scale=case["scale"], sink_weights=sinks)
    for name in list_attention_backends():
        backend = get_attention_backend(name)(attn_mask_type=case["mask_type"], fixed_block_size=case["fixed"])
        if sinks is not None and not backend.supports_sinks:
            continue
        mask = backend.build_mask(ids, EOS, sliding_windows=(case["window"],))
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = backend(
            *leaves,
            scale=case["scale"],
            sink_weights=sinks,
            sliding_window=case["window"],
            enable_gqa=case["h_q"] != case["h_kv"],
            attention_mask=mask,
        )
        err = (out.double() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= 1e-5, (name, float(err))
        # No leak: a query's output has zero gradient with respect to every key/value it may not read.
        for b, qi in [(b, qi) for b in range(batch) for qi in range(seq_len)][:: max(1, batch * seq_len // 4)]:
            hidden = ~allowed[b, qi]
            if not hidden.any():
                continue
            _, grad_k, grad_v = torch.autograd.grad(out[b, :, qi].sum(), leaves, retain_graph=True)
            assert torch.count_nonzero(grad_k[b][:, hidden]) == 0, (name, b, qi)
            assert torch.count_nonzero(grad_v[b][:, hidden]) == 0, (name, b, qi)
