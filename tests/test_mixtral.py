"""The mixtral family against transformers' MixtralForCausalLM (float32, CPU, odd shapes): logits on every
backend (with a sliding window shorter than the sequence), packed documents, the load-balancing loss, the
export round trip, the published sizes."""

from __future__ import annotations

import json

import pytest
import torch
from model_utils import EOS, packed_documents_diff, random_ids, randomize_
from safetensors.torch import load_file

from nemo_lite.components.attention import AttentionConfig, list_attention_backends
from nemo_lite.components.models import AutoModelForCausalLM, get_preset
from nemo_lite.components.models.families.mixtral import MixtralForCausalLM
from nemo_lite.components.models.moe import num_parameters

transformers = pytest.importorskip("transformers")

SEQ = 19
TINY = dict(
    vocab_size=97,
    hidden_size=40,
    intermediate_size=22,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
    num_local_experts=5,
    num_experts_per_tok=2,
    sliding_window=6,
    output_router_logits=True,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=EOS,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = transformers.MixtralConfig(**TINY)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    theirs = randomize_(transformers.MixtralForCausalLM(config).eval(), 1)
    path = tmp_path_factory.mktemp("mixtral")
    theirs.save_pretrained(path, max_shard_size="30KB")
    return theirs, path


@pytest.mark.parametrize("backend", list_attention_backends())
def test_mixtral_logits_and_aux_loss_equal_transformers(backend, checkpoint):
    theirs, path = checkpoint
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend=backend))
    assert type(ours) is MixtralForCausalLM and ours.sliding_windows == (5,)
    ids = random_ids(2, SEQ, TINY["vocab_size"])
    with torch.no_grad():
        out = theirs(ids, labels=ids)
        diff = (ours(ids) - out.logits).abs().max().item()
    print(f"\n[parity] mixtral {backend}: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-4
    torch.testing.assert_close(ours.load_balancing_loss(), out.aux_loss, rtol=1e-6, atol=1e-7)


def test_mixtral_packed_documents_equal_each_document_alone(checkpoint):
    theirs, path = checkpoint
    diff = packed_documents_diff(theirs, path, "flex", TINY["vocab_size"])
    assert diff <= 1e-4


def test_mixtral_export_round_trips_bitwise(checkpoint, tmp_path):
    theirs, path = checkpoint
    out = AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "export", max_shard_size="30KB")
    original = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert exported.keys() == original.keys() and "model.layers.1.block_sparse_moe.experts.4.w3.weight" in exported
    assert all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 5
    ids = random_ids(1, SEQ, TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, theirs(ids).logits)


def test_router_jitter_noise_is_refused_in_one_line(checkpoint, tmp_path):
    from nemo_lite.components.models import CheckpointError

    theirs, _ = checkpoint
    theirs.config.router_jitter_noise = 0.1
    theirs.save_pretrained(tmp_path)
    theirs.config.router_jitter_noise = 0.0
    with pytest.raises(CheckpointError, match=r"router_jitter_noise=0.1 is not supported .* set it to 0.0"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_mixtral_8x7b_has_its_published_sizes():
    """46.7B parameters, 12.9B active (Mistral's announcement), and transformers' own count."""
    from nemo_lite.components.models.hf import config_to_hf

    config = get_preset("mixtral-8x7b")
    assert round(num_parameters(config) / 1e9, 1) == 46.7
    assert round(num_parameters(config, active=True) / 1e9, 1) == 12.9
    fields = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        theirs = transformers.MixtralForCausalLM(transformers.MixtralConfig(**fields))
    assert sum(p.numel() for p in theirs.parameters()) == num_parameters(config)
