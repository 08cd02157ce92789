"""The registry: lookup by exact name, a clear error otherwise, and backends added from outside."""

from __future__ import annotations

import pytest
import torch

from nemo_lite.components.attention import (
    AttentionBackend,
    attention_math,
    get_attention_backend,
    list_attention_backends,
    register_attention_backend,
    unregister_attention_backend,
)
from nemo_lite.components.attention.masks import dense_mask


def test_builtin_backends_are_registered():
    assert {"eager", "sdpa", "flex"} <= set(list_attention_backends())


def test_unknown_name_lists_registered_backends():
    with pytest.raises(KeyError) as info:
        get_attention_backend("flash9")
    message = str(info.value)
    assert "'flash9'" in message
    for name in list_attention_backends():
        assert name in message


def test_name_clash_is_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_attention_backend("sdpa")
        class Another(AttentionBackend):
            pass


@pytest.fixture
def doubling_backend():
    """A backend defined in a test: one class, one registration, nothing else edited."""

    @register_attention_backend("test_math")
    class MathAttention(AttentionBackend):
        calls = 0

        def forward(
            self, q, k, v, scale=None, sink_weights=None, sliding_window=0, enable_gqa=False, attention_mask=None
        ):
            type(self).calls += 1
            allowed = self._mask_for(attention_mask, q, sliding_window)
            return attention_math(q, k, v, allowed, scale=scale, sink_weights=sink_weights, enable_gqa=enable_gqa)

    yield MathAttention
    unregister_attention_backend("test_math")


def test_backend_registered_in_a_test_is_selectable(doubling_backend):
    assert "test_math" in list_attention_backends()
    backend = get_attention_backend("test_math")(attn_mask_type="block_causal")
    ids = torch.tensor([[1, 2, 0, 3, 4, 0, 5, 6]])
    mask = backend.build_mask(ids, 0)
    assert mask.backend == "test_math"
    q = torch.randn(1, 2, 8, 4)
    out = backend(q, q, q, attention_mask=mask)
    expected_mask = dense_mask(8, doc_ids_BS=torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]]))
    torch.testing.assert_close(out, attention_math(q, q, q, expected_mask))
    assert doubling_backend.calls == 1


def test_flex_kernel_options_are_a_choice_and_only_tuned_for_gpus():
    from nemo_lite.components.attention.flex_attention import tuned_kernel_options
    from nemo_lite.training.config import ConfigError, RecipeConfig, validate

    assert tuned_kernel_options("cpu", 64) is None  # torch's defaults off the GPU
    cfg = RecipeConfig()
    cfg.attention.flex_kernel_options = "fast"
    with pytest.raises(
        ConfigError, match="attention.flex_kernel_options='fast' is not valid; choose one of: auto, torch"
    ):
        validate(cfg)
