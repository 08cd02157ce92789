"""The registry: lookup by exact name, a clear error otherwise, and backends added from outside."""

from __future__ import annotations

import pytest
import torch

from nemo_lite.components.attention import (
    AttentionBackend,
    AttentionConfigError,
    attention_math,
    build_attention_backend,
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


def test_unknown_option_is_refused_with_the_valid_names():
    cases = [
        ("flex", {"host_sync": False}, "attention=flex has no option 'host_sync'; its options: kernel_options"),
        (
            "varlen",
            {"kernel_options": "torch"},
            "attention=varlen has no option 'kernel_options'; its options: host_sync",
        ),
        ("sdpa", {"host_sync": False}, "attention=sdpa has no option 'host_sync'; it takes no options"),
    ]
    for name, options, message in cases:
        with pytest.raises(AttentionConfigError) as info:
            build_attention_backend(name, options=options)
        assert str(info.value) == message
        assert isinstance(info.value, ValueError)


def test_bad_option_values_name_the_valid_ones():
    with pytest.raises(AttentionConfigError) as info:
        build_attention_backend("flex", options={"kernel_options": "fast"})
    assert str(info.value) == (
        "attention=flex option kernel_options='fast' is not valid; choose one of: auto, torch, "
        "or a dict of flex_attention kernel_options"
    )
    with pytest.raises(AttentionConfigError, match="host_sync='no' is not valid; choose true or false"):
        build_attention_backend("varlen", options={"host_sync": "no"})
    with pytest.raises(AttentionConfigError, match="kernel_options=7"):  # the constructor checks too
        get_attention_backend("flex")(kernel_options=7)


def test_options_reach_the_backend():
    assert get_attention_backend("flex").option_names() == ("kernel_options",)
    assert get_attention_backend("varlen").option_names() == ("host_sync",)
    assert get_attention_backend("eager").option_names() == ()
    varlen = build_attention_backend(
        "varlen", attn_mask_type="block_causal", fixed_block_size=4, options={"host_sync": False}
    )
    assert (varlen.attn_mask_type, varlen.fixed_block_size, varlen.host_sync) == ("block_causal", 4, False)
    assert build_attention_backend("varlen").host_sync is True
    assert build_attention_backend("sdpa", options={}).attn_mask_type == "causal"


def test_flex_kernel_options_belong_to_the_instance():
    from nemo_lite.components.attention.flex_attention import FlexAttention, tuned_kernel_options

    tiles = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    tuned = build_attention_backend("flex", options={"kernel_options": "auto"})
    plain = build_attention_backend("flex", options={"kernel_options": "torch"})
    given = build_attention_backend("flex", options={"kernel_options": tiles})
    assert (tuned.kernel_options, plain.kernel_options, given.kernel_options) == ("auto", "torch", tiles)
    assert get_attention_backend("flex")().kernel_options == "auto"  # the default
    assert "kernel_options" not in vars(FlexAttention)  # no class-wide switch
    q = torch.randn(1, 2, 8, 16)
    assert plain._kernel_options_for(q) is None
    assert given._kernel_options_for(q) == tiles
    assert tuned_kernel_options("cpu", 64) is None  # torch's defaults off the GPU


def test_check_run_refuses_what_the_backend_cannot_serve():
    flex = get_attention_backend("flex")
    with pytest.raises(AttentionConfigError) as info:
        flex.check_run(seq_len=1000, device_type="cuda", options={})
    assert str(info.value) == (
        "attention=flex on GPU needs data.seq_len to be a multiple of 128 (its BlockMask block size) so shapes "
        "stay static; got 1000: use data.seq_len=1024, or another backend"
    )
    flex.check_run(seq_len=1000, device_type="cpu")  # CPU: any length
    flex.check_run(seq_len=1024, device_type="cuda", options={"kernel_options": "torch"})
    with pytest.raises(AttentionConfigError, match="has no option 'host_sync'"):
        flex.check_run(seq_len=1024, device_type="cuda", options={"host_sync": True})
    for name in list_attention_backends():
        if name != "flex":
            get_attention_backend(name).check_run(seq_len=1000, device_type="cuda", options=None)


def test_describe_is_one_line_per_backend():
    for name in list_attention_backends():
        backend = get_attention_backend(name)(attn_mask_type="block_causal")
        for device_type in ("cpu", "cuda"):
            line = backend.describe(device_type)
            assert line.startswith(f"{name}: ") and "\n" not in line and len(line) < 200, line
    assert "math path" in get_attention_backend("varlen")().describe("cpu")
    assert "is_causal=True" in get_attention_backend("sdpa")().describe("cuda")


def test_a_backend_registered_outside_declares_its_options():
    @register_attention_backend("test_scaled")
    class ScaledAttention(AttentionBackend):
        def __init__(self, attn_mask_type="causal", fixed_block_size=None, *, temperature: float = 1.0):
            super().__init__(attn_mask_type, fixed_block_size)
            self.temperature = temperature

    try:
        assert ScaledAttention.option_names() == ("temperature",)
        assert build_attention_backend("test_scaled", options={"temperature": 2.0}).temperature == 2.0
        with pytest.raises(AttentionConfigError, match="has no option 'temp'; its options: temperature"):
            build_attention_backend("test_scaled", options={"temp": 2.0})
        assert get_attention_backend("test_scaled")().describe("cpu") == "test_scaled: ScaledAttention"
    finally:
        unregister_attention_backend("test_scaled")


# ---- AttentionConfig: the one attention spec ------------------------------------------------------


def test_attention_config_builds_the_backend_it_names():
    from nemo_lite.components.attention import AttentionConfig

    backend = AttentionConfig(
        backend="varlen", attn_mask_type="block_causal", fixed_block_size=4, options={"host_sync": False}
    ).build()
    assert type(backend) is get_attention_backend("varlen")
    assert (backend.attn_mask_type, backend.fixed_block_size, backend.host_sync) == ("block_causal", 4, False)
    default = AttentionConfig().build()  # a plain model's default
    assert (default.name, default.attn_mask_type, default.fixed_block_size) == ("sdpa", "causal", None)


@pytest.mark.parametrize(
    "fields,error,message",
    [
        (dict(backend="flash9"), KeyError, "unknown attention backend 'flash9'; registered backends: eager, flex"),
        (
            dict(attn_mask_type="sliding"),
            AttentionConfigError,
            "attention.attn_mask_type='sliding' is not valid; choose one of: causal, block_causal, shared_prompt",
        ),
        (dict(fixed_block_size=0), AttentionConfigError, "attention.fixed_block_size=0 must be an integer > 0"),
        (dict(fixed_block_size=True), AttentionConfigError, "attention.fixed_block_size=True must be an integer"),
        (dict(backend="sdpa", options={"host_sync": False}), AttentionConfigError, "attention=sdpa has no option"),
    ],
)
def test_attention_config_refuses_a_bad_value_in_one_line(fields, error, message):
    from nemo_lite.components.attention import AttentionConfig

    with pytest.raises(error) as info:
        AttentionConfig(**fields).build()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_models_take_only_an_attention_config():
    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.components.models import LlamaForCausalLM, get_preset

    config = get_preset("tiny", num_hidden_layers=1)
    model = LlamaForCausalLM(config)
    assert (model.attention_backend.name, model.attention_backend.attn_mask_type) == ("sdpa", "causal")
    flex = LlamaForCausalLM(config, attention=AttentionConfig(backend="flex", attn_mask_type="block_causal"))
    assert all(layer.attention.backend is flex.attention_backend for layer in flex.layers)  # built once
    with pytest.raises(TypeError, match="attention must be an AttentionConfig"):
        LlamaForCausalLM(config, attention="flex")


def test_attention_config_is_the_recipes_attention_schema():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.training.config import RecipeConfig, register_schema

    assert RecipeConfig().attention == AttentionConfig(backend="flex", attn_mask_type="block_causal")
    register_schema()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("pretrain", ["attention=varlen", "attention.options.host_sync=false"]))
        sdpa = OmegaConf.to_object(compose("pretrain", ["attention=sdpa", "attention.fixed_block_size=16"]))
    assert cfg.attention == AttentionConfig(
        backend="varlen", attn_mask_type="block_causal", options={"host_sync": False}
    )
    assert sdpa.attention == AttentionConfig(backend="sdpa", attn_mask_type="block_causal", fixed_block_size=16)
