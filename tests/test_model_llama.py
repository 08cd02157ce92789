"""The decoder on its own: configs and presets, rotary embedding vs transformers, mask plumbing."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from model_utils import EOS, ours_config, pack, random_ids

from nemo_lite.components.attention import AttentionConfig, get_attention_backend, list_attention_backends
from nemo_lite.components.models import (
    LlamaConfig,
    LlamaForCausalLM,
    RopeScaling,
    UnknownPresetError,
    generate,
    get_preset,
    list_presets,
    rope_inv_freq,
    rotary_cos_sin,
)

# ---- config and presets ---------------------------------------------------------------------------


def test_presets_exist_and_unknown_name_lists_them():
    assert {"tiny", "smollm2-135m", "llama-3.2-1b", "llama-3-8b"} <= set(list_presets())
    with pytest.raises(UnknownPresetError) as err:
        get_preset("llama-3.2-1B")  # exact names only
    for name in list_presets():
        assert name in str(err.value)


def test_llama_3_2_1b_preset_matches_the_real_model():
    c = get_preset("llama-3.2-1b")
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (128256, 2048, 16)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size) == (32, 8, 64, 8192)
    assert c.tie_word_embeddings and c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )


def test_get_preset_returns_a_copy_with_overrides():
    c = get_preset("llama-3.2-1b", num_hidden_layers=2)
    assert c.num_hidden_layers == 2
    c.rope_scaling.factor = 1.0
    c.vocab_size = 7
    fresh = get_preset("llama-3.2-1b")
    assert fresh.num_hidden_layers == 16 and fresh.vocab_size == 128256 and fresh.rope_scaling.factor == 32.0


def test_config_is_keyword_only_and_validated():
    with pytest.raises(TypeError):
        LlamaConfig(128, 64, 96, 2, 4)  # type: ignore[misc]
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        LlamaConfig(
            vocab_size=8,
            hidden_size=64,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=3,
        )
    with pytest.raises(ValueError, match="set head_dim explicitly"):
        LlamaConfig(vocab_size=8, hidden_size=60, intermediate_size=8, num_hidden_layers=1, num_attention_heads=8)
    c = LlamaConfig(
        vocab_size=8,
        hidden_size=60,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=8,
        head_dim=16,
        rope_scaling={"factor": 8.0},
    )
    assert c.num_key_value_heads == 8 and c.head_dim == 16 and isinstance(c.rope_scaling, RopeScaling)
    with pytest.raises(ValueError, match="rope_type='longrope' is not supported; supported: default, linear"):
        RopeScaling(rope_type="longrope", factor=2.0)


@pytest.mark.parametrize(
    "name", ["llama.LlamaConfig", "qwen2.Qwen2Config", "qwen3.Qwen3Config", "mistral.MistralConfig", "RopeScaling"]
)
def test_every_field_is_documented(name):
    import importlib
    import inspect

    from nemo_lite.components.models import decoder

    module, _, cls_name = name.rpartition(".")
    where = importlib.import_module(f"nemo_lite.components.models.families.{module}") if module else decoder
    cls = getattr(where, cls_name)
    lines = [line for base in cls.__mro__[:-1] for line in inspect.getsource(base).splitlines()]
    for f in dataclasses.fields(cls):
        (i,) = [i for i, line in enumerate(lines) if line.strip().startswith(f"{f.name}:")]
        assert lines[i - 1].strip().startswith("#"), f"{f.name} has no comment above it"


# ---- rotary embedding vs transformers -------------------------------------------------------------


def _hf_rotary(config: LlamaConfig):
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": config.rope_theta,
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        }
    hf = transformers.LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=rope,
    )
    return LlamaRotaryEmbedding(hf)


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "smollm2-135m", "llama-3-8b", "tiny"])
def test_rope_matches_transformers_bitwise(preset):
    config = get_preset(preset)
    hf_rotary = _hf_rotary(config)
    assert torch.equal(rope_inv_freq(config), hf_rotary.inv_freq)
    # far beyond original_max_position_embeddings (8192) for llama-3.2-1b's llama3 scaling
    positions = torch.tensor([[0, 1, 17, 4095, 8191, 8192, 8193, 20000, 65536, 131071]])
    cos, sin = rotary_cos_sin(config, positions)
    hf_cos, hf_sin = hf_rotary(torch.zeros(1, dtype=torch.float32), positions)
    assert cos.dtype == torch.float32 and cos.shape == (1, 1, positions.shape[1], config.head_dim)
    assert torch.equal(cos[:, 0], hf_cos) and torch.equal(sin[:, 0], hf_sin)


def test_llama3_scaling_changes_low_frequencies_only():
    config = get_preset("llama-3.2-1b")
    plain = rope_inv_freq(dataclasses.replace(config, rope_scaling=None))
    scaled = rope_inv_freq(config)
    wavelen = 2 * math.pi / plain
    assert torch.equal(scaled[wavelen < 8192 / 4], plain[wavelen < 8192 / 4])
    torch.testing.assert_close(scaled[wavelen > 8192], plain[wavelen > 8192] / 32)


# ---- the model --------------------------------------------------------------------------------------


def _tiny_model(variant="tied", **kwargs) -> LlamaForCausalLM:
    model = LlamaForCausalLM(ours_config(variant), **kwargs)
    model.init_weights(seed=0)
    return model.eval()


def test_forward_is_output_projection_of_forward_hidden():
    for variant in ("tied", "untied"):
        model = _tiny_model(variant)
        ids = random_ids(2, 12, model.config.vocab_size)
        hidden = model.forward_hidden(ids)
        assert hidden.shape == (2, 12, model.config.hidden_size)
        logits = model(ids)
        assert logits.shape == (2, 12, model.config.vocab_size)
        torch.testing.assert_close(logits, F.linear(hidden, model.output_weight), rtol=0, atol=0)
        if variant == "tied":
            assert model.lm_head is None and model.output_weight is model.embed_tokens.weight
        else:
            assert model.output_weight is model.lm_head.weight


def test_layers_is_a_module_list_of_blocks():
    model = _tiny_model()
    assert isinstance(model.layers, torch.nn.ModuleList) and len(model.layers) == model.config.num_hidden_layers


def test_every_layer_gets_the_same_mask_object_built_once(monkeypatch):
    model = _tiny_model(attention=AttentionConfig(backend="sdpa", attn_mask_type="block_causal"))
    backend = model.attention_backend
    built, seen = [], []
    original_build, original_forward = backend.build_mask, type(backend).forward

    def build_mask(*args, **kwargs):
        built.append(kwargs.get("sliding_windows"))
        return original_build(*args, **kwargs)

    def forward(self, *args, attention_mask=None, **kwargs):
        seen.append(attention_mask)
        return original_forward(self, *args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(backend, "build_mask", build_mask)
    monkeypatch.setattr(type(backend), "forward", forward)
    ids = random_ids(2, 16, model.config.vocab_size)
    ids[0, 5] = EOS
    model(ids)
    assert built == [(0,)]
    assert len(seen) == model.config.num_hidden_layers and all(m is seen[0] for m in seen)
    assert seen[0].doc_ids is not None  # block_causal from config.eos_token_id


def test_input_ids_alone_give_causal_logits():
    model = _tiny_model()
    ids = random_ids(1, 10, model.config.vocab_size)
    full = model(ids)
    for t in (1, 4, 9):
        torch.testing.assert_close(model(ids[:, : t + 1])[:, t], full[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids, position_ids=torch.arange(10)[None]), full, rtol=0, atol=0)


@pytest.mark.parametrize("backend", list_attention_backends())
def test_packed_documents_equal_separate_documents(backend):
    model = _tiny_model("untied", attention=AttentionConfig(backend=backend, attn_mask_type="block_causal"))
    eos = torch.tensor([EOS])
    d = [random_ids(1, n, model.config.vocab_size, seed=n)[0] for n in (5, 9, 3, 7, 10)]
    ids, positions, slices = pack(
        [[torch.cat([d[0], eos]), torch.cat([d[1], eos]), d[2]], [torch.cat([d[3], eos]), eos, d[4]]]
    )  # EOS EOS: a 1-token document
    with torch.no_grad():
        packed = model(ids, position_ids=positions, attention_mask=model.build_attention_mask(ids))
        reference = _tiny_model("untied", attention=AttentionConfig(backend="eager"))
        for row, row_slices in enumerate(slices):
            for sl in row_slices:
                alone = reference(ids[row : row + 1, sl])
                torch.testing.assert_close(packed[row : row + 1, sl], alone, rtol=1e-5, atol=1e-5)


def test_all_backends_agree():
    ids = random_ids(2, 20, 128)
    outs = {name: _tiny_model(attention=AttentionConfig(backend=name))(ids) for name in list_attention_backends()}
    for name, out in outs.items():
        torch.testing.assert_close(out, outs["eager"], rtol=1e-5, atol=1e-5, msg=name)


def test_unknown_backend_is_an_error():
    with pytest.raises(KeyError, match="registered backends"):
        LlamaForCausalLM(get_preset("tiny"), attention=AttentionConfig(backend="nope"))


def test_attention_backend_is_looked_up_in_the_registry():
    model = _tiny_model(attention=AttentionConfig(backend="eager"))
    assert type(model.attention_backend) is get_attention_backend("eager")
    assert all(layer.attention.backend is model.attention_backend for layer in model.layers)


def test_init_weights_is_seeded_and_documented_std():
    a, b, c = _tiny_model(), LlamaForCausalLM(ours_config("tied")), LlamaForCausalLM(ours_config("tied"))
    b.init_weights(seed=0)
    c.init_weights(seed=1)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if "norm" in name:
            assert torch.equal(pa, torch.ones_like(pa))
        else:
            assert not torch.equal(pa, pc)
    weight = a.layers[0].mlp.down_proj.weight
    assert abs(weight.std().item() - 0.02) < 0.002  # output projections are not depth-scaled
    with torch.device("meta"):
        meta = LlamaForCausalLM(ours_config("tied"))
    with pytest.raises(RuntimeError, match="to_empty"):
        meta.init_weights(0)


def test_gradients_flow_in_bfloat16():
    model = _tiny_model("attention_bias").to(torch.bfloat16).train()
    ids = random_ids(2, 8, model.config.vocab_size)
    logits = model(ids)
    assert logits.dtype == torch.bfloat16
    F.cross_entropy(logits.float().flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_generate_is_greedy_and_stops_at_eos():
    model = _tiny_model()
    ids = random_ids(2, 5, model.config.vocab_size)
    out = generate(model, ids, 6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], ids)
    for t in range(5, 11):
        assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))
    first = out[0, 5].item()
    stopped = generate(model, ids[:1], 6, eos_token_id=first)
    assert stopped.shape == (1, 6)


def test_a_preset_reshaped_by_overrides_derives_head_dim_again():
    """The default `small` model is `tiny` with hidden 256 and 8 heads: head_dim 32, not tiny's 16."""
    from nemo_lite.components.models import get_preset

    assert get_preset("tiny", hidden_size=256, num_attention_heads=8).head_dim == 32
    assert get_preset("tiny", hidden_size=96, num_attention_heads=4, head_dim=16).head_dim == 16  # a choice
    assert get_preset("qwen3-0.6b", hidden_size=512).head_dim == 128  # the preset chose it apart from its shape
    with pytest.raises(ValueError, match="hidden_size=100 is not divisible by num_attention_heads=8: set head_dim"):
        get_preset("tiny", hidden_size=100, num_attention_heads=8)


def test_the_small_preset_is_tiny_with_the_pretraining_shape():
    """``small`` (the pretraining recipe's model) is the tiny preset with the shape configs/model/small.yaml
    gave it as overrides, so the recipe's numbers stay those of that shape."""
    shape = dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
    )
    assert get_preset("small") == get_preset("tiny", **shape)
