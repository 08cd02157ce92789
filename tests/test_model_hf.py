"""Hugging Face import/export against transformers itself, on tiny random configs."""

from __future__ import annotations

import json

import pytest
import torch
from model_utils import EOS, TINY, VARIANTS, hf_model, ours_config, pack, random_ids, randomize_
from safetensors.torch import load_file, save_file

from nemo_lite.components.attention import AttentionConfig, list_attention_backends
from nemo_lite.components.models import CheckpointError, LlamaForCausalLM, get_preset, hf
from nemo_lite.components.models.hf import HF_KEY_MAP, config_from_hf, config_to_hf, parse_size, to_hf_key

transformers = pytest.importorskip("transformers")

SEQ = 40
# Positions beyond the llama3 variant's original_max_position_embeddings (32).
POSITIONS = torch.arange(100, 100 + SEQ)[None]


def _hf_load(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _hf_logits(model, ids, positions=POSITIONS):
    with torch.no_grad():
        return model(ids, position_ids=positions.expand(ids.shape[0], -1)).logits


def _ours_logits(model, ids, positions=POSITIONS):
    with torch.no_grad():
        return model(ids, position_ids=positions)


# ---- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", [*VARIANTS, "sharded"])
def test_nemo_to_transformers(variant, tmp_path):
    config = ours_config("untied" if variant == "sharded" else variant)
    # eager on both sides: the same float32 math, so any difference is the checkpoint's mapping
    ours = randomize_(LlamaForCausalLM(config, attention=AttentionConfig(backend="eager")), seed=1).eval()
    shard = "40KB" if variant == "sharded" else "2GB"
    ours.save_pretrained(tmp_path / "ckpt", max_shard_size=shard)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForCausalLM"]
    assert saved["torch_dtype"] == "float32"
    shards = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    if variant == "sharded":
        assert len(shards) > 2 and (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    else:
        assert shards == ["model.safetensors"]

    theirs = _hf_load(tmp_path / "ckpt")
    ids = random_ids(2, SEQ, config.vocab_size)
    diff = (_ours_logits(ours, ids) - _hf_logits(theirs, ids)).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("variant", [*VARIANTS, "sharded"])
def test_transformers_to_nemo(variant, tmp_path):
    theirs = hf_model("untied" if variant == "sharded" else variant, seed=2)
    theirs.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB" if variant == "sharded" else "2GB")
    if variant == "sharded":
        assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", attention=AttentionConfig(backend="eager"))
    ids = random_ids(2, SEQ, ours.config.vocab_size)
    diff = (_ours_logits(ours, ids) - _hf_logits(theirs, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_legacy_config_form_reads_the_same(tmp_path):
    """A config.json in the transformers 4.x form (top-level rope_theta, rope_scaling) loads the same."""
    theirs = hf_model("llama3_rope", seed=3)
    theirs.save_pretrained(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(config_file.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    cfg["eos_token_id"] = [EOS, 5]
    config_file.write_text(json.dumps(cfg))
    ours = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert ours.config == ours_config("llama3_rope")
    ids = random_ids(1, SEQ, ours.config.vocab_size)
    assert (_ours_logits(ours, ids) - _hf_logits(theirs, ids)).abs().max().item() <= 1e-5


def test_real_llama_3_2_1b_config_json_gives_the_preset():
    real = {  # meta-llama/Llama-3.2-1B config.json (transformers 4.45 form)
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }
    assert config_from_hf(real) == get_preset("llama-3.2-1b")
    assert config_from_hf(config_to_hf(get_preset("llama-3.2-1b"))) == get_preset("llama-3.2-1b")


@pytest.mark.parametrize("preset", ["tiny", "smollm2-135m", "llama-3.2-1b", "llama-3-8b"])
def test_presets_have_the_parameter_shapes_of_transformers(preset):
    config = get_preset(preset)
    hf_config = transformers.LlamaConfig.from_dict(config_to_hf(config))
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(hf_config)
        ours = LlamaForCausalLM(config)
    their_shapes = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    if config.tie_word_embeddings:
        their_shapes.pop("lm_head.weight", None)
    assert {to_hf_key(k): tuple(v.shape) for k, v in ours.state_dict().items()} == their_shapes


def test_key_map_covers_every_parameter_of_every_variant():
    from nemo_lite.components.models.families.gpt_oss import GptOssForCausalLM
    from nemo_lite.components.models.families.qwen3 import Qwen3Config, Qwen3ForCausalLM

    qwen3 = Qwen3ForCausalLM(Qwen3Config(**TINY))
    # gpt_oss: the sinks, a router with a bias, stacked experts with biases
    gpt_oss = GptOssForCausalLM(get_preset("gpt-oss-20b", **TINY, num_experts=3, num_experts_per_tok=2))
    used = set()
    for model in [*(LlamaForCausalLM(ours_config(variant)) for variant in VARIANTS), qwen3, gpt_oss]:
        for name in model.state_dict():
            to_hf_key(name)
            used.add(name.replace("layers.0.", "layers.{i}.").replace("layers.1.", "layers.{i}."))
    assert used == set(HF_KEY_MAP)  # no dead entries either


# ---- packed batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", list_attention_backends())
def test_packed_batch_matches_transformers_per_document(backend, tmp_path):
    theirs = hf_model("untied", seed=4)
    theirs.save_pretrained(tmp_path / "ckpt")
    ours = LlamaForCausalLM.from_pretrained(
        tmp_path / "ckpt", attention=AttentionConfig(backend=backend, attn_mask_type="block_causal")
    )
    eos = torch.tensor([EOS])
    d = [random_ids(1, n, ours.config.vocab_size, seed=n)[0] for n in (7, 12, 4, 9, 14)]
    ids, positions, slices = pack(
        [[torch.cat([d[0], eos]), torch.cat([d[1], eos]), d[2]], [torch.cat([d[3], eos]), eos, d[4]]]
    )
    with torch.no_grad():
        packed = ours(ids, position_ids=positions, attention_mask=ours.build_attention_mask(ids))
        for row, row_slices in enumerate(slices):
            for sl in row_slices:
                alone = theirs(ids[row : row + 1, sl]).logits
                # other kernels than transformers' eager: float32 summation order, not exact
                torch.testing.assert_close(packed[row : row + 1, sl], alone, rtol=1e-5, atol=1e-5)


# ---- loading: bad checkpoints, dtype, meta device -----------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    hf_model("tied", seed=5).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _edit_weights(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_dir):
    _edit_weights(hf_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        LlamaForCausalLM.from_pretrained(hf_dir)


def test_unexpected_tensor_is_named(hf_dir):
    _edit_weights(hf_dir, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.q_norm\.weight"):
        LlamaForCausalLM.from_pretrained(hf_dir)


def test_wrong_shape_is_named(hf_dir):
    _edit_weights(hf_dir, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight is \[65\], expected \[64\]"):
        LlamaForCausalLM.from_pretrained(hf_dir)


def test_all_problems_in_one_error(hf_dir):
    def edit(t):
        t.pop("model.embed_tokens.weight")
        t["extra.weight"] = torch.zeros(1)
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 64)

    _edit_weights(hf_dir, edit)
    with pytest.raises(CheckpointError) as err:
        LlamaForCausalLM.from_pretrained(hf_dir)
    message = str(err.value)
    for name in ("model.embed_tokens.weight", "extra.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert name in message


def test_other_model_type_is_refused(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model_type='mistral' is not supported; accepted model_type: llama"):
        LlamaForCausalLM.from_pretrained(hf_dir)


def test_unsupported_rope_type_and_activation_are_refused():
    base = {
        "model_type": "llama",
        **{k: 8 for k in ("vocab_size", "hidden_size", "intermediate_size")},
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(CheckpointError, match="rope_type='longrope' is not supported; supported: default, linear"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 4.0}})
    with pytest.raises(CheckpointError, match="hidden_act='gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(CheckpointError, match="lacks required keys: vocab_size"):
        config_from_hf({k: v for k, v in base.items() if k != "vocab_size"})


def test_pickle_checkpoints_are_not_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(ours_config("tied"))))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="only safetensors are read"):
        LlamaForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("with_lm_head", [True, False])
def test_tied_checkpoint_with_or_without_lm_head(hf_dir, with_lm_head):
    def edit(t):
        if with_lm_head:
            t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        else:
            t.pop("lm_head.weight", None)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old transformers buffer: ignored

    _edit_weights(hf_dir, edit)
    ours = LlamaForCausalLM.from_pretrained(hf_dir)
    theirs = _hf_load(hf_dir) if not with_lm_head else None
    ids = random_ids(1, 16, ours.config.vocab_size)
    assert ours.lm_head is None
    if theirs is not None:
        assert (_ours_logits(ours, ids, torch.arange(16)[None]) - theirs(ids).logits).abs().max() <= 1e-5


def test_builds_on_meta_and_loads_into_the_requested_dtype(hf_dir, monkeypatch):
    constructed_on = []
    original_init = LlamaForCausalLM.__init__

    def spy_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        constructed_on.append({p.device.type for p in self.parameters()})

    monkeypatch.setattr(LlamaForCausalLM, "__init__", spy_init)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attention=AttentionConfig(backend="eager"))
    assert constructed_on == [{"meta"}]  # no real allocation before the tensors are read
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cpu", torch.bfloat16)}
    reference = LlamaForCausalLM.from_pretrained(hf_dir)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q.to(torch.bfloat16)), name
    ids = random_ids(1, 12, model.config.vocab_size)
    with torch.no_grad():
        logits, expected = model(ids), reference(ids)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - expected).abs().mean() < 0.03 * expected.abs().mean()


# ---- saving: atomic, tokenizer ------------------------------------------------------------------


def test_save_is_atomic_when_it_fails(tmp_path, monkeypatch):
    model = randomize_(LlamaForCausalLM(ours_config("untied")), seed=6)
    target = tmp_path / "out"
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def failing_save_file(tensors, filename, **kwargs):
        if "00002-of" in str(filename):  # the second shard
            raise OSError("disk full")
        return save_file(tensors, filename, **kwargs)

    monkeypatch.setattr("safetensors.torch.save_file", failing_save_file)
    other = randomize_(LlamaForCausalLM(ours_config("untied")), seed=7)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(target, max_shard_size="40KB")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old checkpoint, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left
    with pytest.raises(OSError):
        other.save_pretrained(tmp_path / "new", max_shard_size="40KB")
    assert not (tmp_path / "new").exists()


def test_save_replaces_an_existing_directory(tmp_path):
    target = tmp_path / "out"
    randomize_(LlamaForCausalLM(ours_config("untied")), seed=8).save_pretrained(target, max_shard_size="40KB")
    assert (target / "model.safetensors.index.json").exists()
    second = randomize_(LlamaForCausalLM(ours_config("untied")), seed=9).eval()
    second.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]  # stale shards gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    loaded = LlamaForCausalLM.from_pretrained(target)
    for p, q in zip(loaded.parameters(), second.parameters(), strict=True):
        assert torch.equal(p, q)


def test_tokenizer_files_travel_with_the_weights(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text("{}")
    (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "x"}')
    model = LlamaForCausalLM(ours_config("tied"))
    first = model.save_pretrained(tmp_path / "a", tokenizer_dir=tok_dir)
    assert (first / "tokenizer_config.json").read_text() == '{"eos_token": "x"}'
    loaded = LlamaForCausalLM.from_pretrained(first)
    assert loaded.tokenizer_dir == first
    loaded.save_pretrained(tmp_path / "b")  # remembers where it came from
    assert (tmp_path / "b" / "tokenizer.json").is_file()
    loaded.save_pretrained(first)  # over its own source
    assert (first / "tokenizer.json").is_file()


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("40KB") == 40_000 and parse_size(7) == 7
    assert parse_size("1GiB") == 2**30 and parse_size("1.5MB") == 1_500_000
    with pytest.raises(ValueError, match="cannot read"):
        parse_size("2 bananas")


def test_hf_module_is_the_only_place_with_hf_names():
    import importlib
    import inspect

    from nemo_lite.components.models import decoder, families

    modules = [decoder] + [importlib.import_module(f"{families.__name__}.{n}") for n in families.FAMILY_MODULES]
    assert len(modules) >= 5  # the decoder and the llama, qwen2, qwen3 and mistral families
    for module in modules:  # none of them differs from the shared key map
        assert "self_attn" not in inspect.getsource(module) and "input_layernorm" not in inspect.getsource(module)
    assert hf.HF_KEY_MAP is HF_KEY_MAP
