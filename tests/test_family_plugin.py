"""A decoder-variant family is one file: written to a temporary module, imported, it registers itself, builds,
trains a step, and round-trips a Hugging Face checkpoint through AutoModelForCausalLM."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import pytest
import torch

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import (
    AutoModelForCausalLM,
    family_of_checkpoint,
    get_model_family,
    get_preset,
    list_presets,
    unregister_model_family,
)
from nemo_lite.components.models.hf import config_from_hf

# The whole family, as a user writes it (docs/models.md, "Adding a family"): a config field of its own that
# changes the decoder (biases on o only), a preset, transformers' default of its field, an extra key, a
# refusal, and one parameter named differently in its checkpoints.
TOY_FAMILY = '''
from dataclasses import dataclass

from nemo_lite.components.models.decoder import DecoderConfig, DecoderForCausalLM, decoder_family
from nemo_lite.components.models.family import HFFacts, register_model_family
from nemo_lite.components.models.hf import CheckpointError


@dataclass(kw_only=True)
class ToyConfig(DecoderConfig):
    """A decoder with a bias on the attention's output projection only."""

    # A bias on o_proj.
    output_bias: bool = True

    @property
    def o_bias(self) -> bool:
        return self.output_bias


class ToyForCausalLM(DecoderForCausalLM):
    config_class = ToyConfig


PRESETS = {
    "toy-tiny": ToyConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False, eos_token_id=2,
    ),
}


def check(hf):
    if hf.get("toy_version", 1) != 1:
        raise CheckpointError(f"toy_version={hf['toy_version']!r} is not supported; only 1")


HF = HFFacts(
    model_types=("toy",),
    architecture="ToyForCausalLM",
    defaults={"output_bias": False},
    extras={"toy_version": 1},
    check=check,
    key_map={"norm.weight": "model.final_norm.weight"},
)

FAMILY = register_model_family(decoder_family("toy", ToyForCausalLM, PRESETS, HF))
'''


@pytest.fixture
def toy_module(tmp_path):
    path = tmp_path / "toy_family.py"
    path.write_text(textwrap.dedent(TOY_FAMILY))
    spec = importlib.util.spec_from_file_location("toy_family", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["toy_family"] = module
    try:
        spec.loader.exec_module(module)  # registers the family
        yield module
    finally:
        unregister_model_family("toy")
        sys.modules.pop("toy_family", None)


def test_a_family_from_one_file_round_trips_a_checkpoint(toy_module, tmp_path):
    family = get_model_family("toy")
    assert "toy-tiny" in list_presets() and family.model_cls is toy_module.ToyForCausalLM
    config = get_preset("toy-tiny")
    model = family.build(config, attention=AttentionConfig(backend="eager"))
    model.init_weights(seed=3)
    assert model.layers[0].attention.o_proj.bias is not None and model.layers[0].attention.q_proj.bias is None
    assert family.num_parameters(config) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():  # a bias that is not zero, so that reading it back is checked
        for layer in model.layers:
            layer.attention.o_proj.bias.normal_(generator=torch.Generator().manual_seed(1))

    path = model.save_pretrained(tmp_path / "toy")
    written = json.loads((path / "config.json").read_text())
    assert written["model_type"] == "toy" and written["architectures"] == ["ToyForCausalLM"]
    assert written["toy_version"] == 1 and written["output_bias"] is True
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.final_norm.weight" in keys and "model.norm.weight" not in keys  # the family's key map

    assert family_of_checkpoint(path) is family
    loaded = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend="eager"))
    assert type(loaded) is toy_module.ToyForCausalLM and loaded.config == config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), loaded.eval()(ids))


def test_a_family_reads_its_own_defaults_and_refusals(toy_module):
    from nemo_lite.components.models import CheckpointError

    hf = dict(
        model_type="toy", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4,
    )  # fmt: skip
    assert config_from_hf(hf).output_bias is False  # the family's transformers default for a missing key
    with pytest.raises(CheckpointError, match="toy_version=2 is not supported; only 1"):
        config_from_hf({**hf, "toy_version": 2})


def test_the_family_is_gone_after_unregistering(toy_module):
    unregister_model_family("toy")
    assert "toy-tiny" not in list_presets()
    with pytest.raises(KeyError, match="unknown model family 'toy'"):
        get_model_family("toy")
