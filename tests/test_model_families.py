"""Qwen2, Qwen3, Mistral and the rope scalings against transformers itself, on tiny random checkpoints:
every backend's logits, packed documents, sliding windows, exports, presets, the finetune recipe, bad input.

The parity figures of docs/models.md are the largest differences these tests print (``-s``)."""

from __future__ import annotations

import json

import pytest
import torch
from model_utils import (
    EOS,
    FAMILY_TINY,
    FAMILY_VARIANTS,
    family_hf_model,
    hf_logits,
    pack,
    random_ids,
    save_default_tokenizer,
)
from safetensors.torch import load_file

from nemo_lite.components.attention import AttentionConfig, list_attention_backends
from nemo_lite.components.models import (
    AutoModelForCausalLM,
    CheckpointError,
    LlamaForCausalLM,
    UnknownModelTypeError,
    get_model_family,
    get_preset,
    list_presets,
    rotary_cos_sin,
)
from nemo_lite.components.models.families.mistral import MistralForCausalLM
from nemo_lite.components.models.families.qwen2 import Qwen2ForCausalLM
from nemo_lite.components.models.families.qwen3 import Qwen3ForCausalLM
from nemo_lite.components.models.hf import config_from_hf, config_to_hf
from nemo_lite.testing.models import family_of_model

transformers = pytest.importorskip("transformers")

SEQ = 24  # longer than the windows (5, 6) of the mistral and qwen2_window variants
CLASSES = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen2_window": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "mistral": MistralForCausalLM,
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each variant once: the transformers model and its sharded safetensors directory."""
    out = {}
    for variant in FAMILY_VARIANTS:
        theirs = family_hf_model(variant, seed=1)
        path = tmp_path_factory.mktemp(variant)
        theirs.save_pretrained(path, max_shard_size="20KB")
        out[variant] = (theirs, path)
    return out


def _report(what: str, diff: float) -> None:
    print(f"\n[parity] {what}: max |dlogit| = {diff:.2e}")


# ---- logits against transformers, every backend ---------------------------------------------------


@pytest.mark.parametrize("backend", list_attention_backends())
@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_loads_with_the_logits_of_transformers(variant, backend, checkpoints):
    theirs, path = checkpoints[variant]
    assert len(list(path.glob("model-*.safetensors"))) > 2 and (path / "model.safetensors.index.json").is_file()
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend=backend))
    assert type(ours) is CLASSES[variant] and family_of_model(ours).name == variant.removesuffix("_window")
    ids = random_ids(2, SEQ, FAMILY_TINY["vocab_size"])
    with torch.no_grad():
        diff = (ours(ids) - hf_logits(theirs, ids)).abs().max().item()
    _report(f"{variant} {backend}", diff)
    assert diff <= 1e-4


@pytest.fixture(scope="module")
def packed(checkpoints):
    """A packed batch (documents of 1 to 14 tokens, restarting positions) and, per variant, transformers'
    logits of each document run alone."""
    eos = torch.tensor([EOS])
    d = [random_ids(1, n, FAMILY_TINY["vocab_size"], seed=n)[0] for n in (7, 12, 3, 9, 13)]
    ids, positions, slices = pack(
        [[torch.cat([d[0], eos]), torch.cat([d[1], eos]), d[2]], [torch.cat([d[3], eos]), eos, d[4]]]
    )
    pieces = [(row, sl) for row, row_slices in enumerate(slices) for sl in row_slices]
    alone = {
        variant: [hf_logits(checkpoints[variant][0], ids[row : row + 1, sl]) for row, sl in pieces]
        for variant in ("qwen2", "qwen2_window", "qwen3", "mistral")
    }
    return ids, positions, pieces, alone


@pytest.mark.parametrize("backend", list_attention_backends())
@pytest.mark.parametrize("variant", ["qwen2", "qwen2_window", "qwen3", "mistral"])
def test_packed_documents_equal_each_document_alone(variant, backend, checkpoints, packed):
    """block_causal with restarting positions: every document's logits are transformers' on it alone,
    including documents longer than the sliding window."""
    ids, positions, pieces, alone = packed
    ours = AutoModelForCausalLM.from_pretrained(
        checkpoints[variant][1], attention=AttentionConfig(backend=backend, attn_mask_type="block_causal")
    )
    with torch.no_grad():
        out = ours(ids, position_ids=positions, attention_mask=ours.build_attention_mask(ids))
    diff = max(
        (out[row : row + 1, sl] - ref).abs().max().item() for (row, sl), ref in zip(pieces, alone[variant], strict=True)
    )
    _report(f"{variant} {backend} packed vs alone", diff)
    assert diff <= 1e-4


def test_the_window_is_mapped_without_off_by_one(checkpoints):
    """transformers' sliding_window=5 (q - k < 5) is nemo_lite's window 4 (q - k <= 4); 4 or 6 in
    transformers gives other logits, so the mapping is pinned exactly."""
    theirs, path = checkpoints["mistral"]
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend="eager"))
    assert ours.sliding_windows == (4,) and all(layer.attention.sliding_window == 4 for layer in ours.layers)
    windowed = AutoModelForCausalLM.from_pretrained(checkpoints["qwen2_window"][1])
    assert [layer.attention.sliding_window for layer in windowed.layers] == [0, 5]  # max_window_layers=1
    ids = random_ids(1, SEQ, FAMILY_TINY["vocab_size"])
    with torch.no_grad():
        logits = ours(ids)
    for other in (4, 6):
        shifted = family_hf_model("mistral", seed=1, sliding_window=other)
        assert (logits - hf_logits(shifted, ids)).abs().max().item() > 1e-3


# ---- rope types past the original context -------------------------------------------------------

# max_position_embeddings, and the rope fields; positions 100..139 lie past every original context.
ROPES = {
    "default": (64, {"rope_type": "default"}),
    "linear": (64, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": (64, {"rope_type": "dynamic", "factor": 4.0}),
    "yarn": (128, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "yarn_options": (
        256,
        {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "attention_factor": 1.25,
        },
    ),
    "llama3": (
        64,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}
POSITIONS = torch.arange(100, 140)[None]


def _rope_model(family: str, rope: str):
    max_positions, fields = ROPES[rope]
    return family_hf_model(family, seed=3, max_position_embeddings=max_positions, rope_parameters=dict(fields))


def _to_legacy_form(path) -> None:
    """Rewrite a transformers 5 config.json into the 4.x form: top-level rope_theta, rope_scaling with "type"."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    cfg["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("form", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope", list(ROPES))
def test_rope_types_match_transformers_past_the_original_context(rope, form, tmp_path):
    family = "qwen3" if rope.startswith("yarn") else "llama"  # Qwen3 ships yarn for long contexts
    _rope_model(family, rope).save_pretrained(tmp_path)
    if form == "rope_scaling":
        _to_legacy_form(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, attention=AttentionConfig(backend="eager"))
    kind = ROPES[rope][1]["rope_type"]
    assert (ours.config.rope_scaling is None) == (kind == "default")
    ids = random_ids(1, POSITIONS.shape[1], FAMILY_TINY["vocab_size"])
    with torch.no_grad():
        logits = ours(ids, position_ids=POSITIONS)
    # A fresh transformers model: its dynamic rope keeps the longest sequence's frequencies afterwards.
    diff = (logits - hf_logits(_rope_model(family, rope), ids, POSITIONS)).abs().max().item()
    _report(f"{family} rope {rope} ({form}) at positions 100-139", diff)
    assert diff <= 1e-4
    if kind != "default":  # the scaling is not a no-op at these positions
        plain = _rope_model(family, "default")
        plain.load_state_dict(_rope_model(family, rope).state_dict())
        assert (logits - hf_logits(plain, ids, POSITIONS)).abs().max().item() > 1e-3


@pytest.mark.parametrize("rope", list(ROPES))
def test_rotary_cos_sin_equal_transformers_bitwise(rope):
    theirs = _rope_model("llama", rope)
    ours = config_from_hf(theirs.config.to_dict())
    positions = torch.tensor([[0, 1, 31, 32, 33, 63, 64, 65, 139, 1000]])
    rotary = theirs.model.rotary_emb
    hf_cos, hf_sin = rotary(torch.zeros(1), positions)
    cos, sin = rotary_cos_sin(ours, positions)
    assert torch.equal(cos[:, 0], hf_cos) and torch.equal(sin[:, 0], hf_sin)


def test_dynamic_rope_is_a_function_of_each_forwards_positions():
    """Up to max_position_embeddings it is the default rope; beyond, it depends on the longest position
    of the call (not on earlier calls, unlike transformers' cached frequencies)."""
    config = config_from_hf(_rope_model("llama", "dynamic").config.to_dict())
    default = config_from_hf(_rope_model("llama", "default").config.to_dict())
    short = torch.arange(64)[None]
    assert torch.equal(rotary_cos_sin(config, short)[0], rotary_cos_sin(default, short)[0])
    long = torch.arange(100)[None]
    first = rotary_cos_sin(config, long)[0]
    rotary_cos_sin(config, torch.arange(500)[None])
    assert torch.equal(rotary_cos_sin(config, long)[0], first)
    assert not torch.equal(first, rotary_cos_sin(default, long)[0])


# ---- export ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
def test_export_round_trips_bitwise(variant, checkpoints, tmp_path):
    theirs, path = checkpoints[variant]
    ours = AutoModelForCausalLM.from_pretrained(path)
    out = ours.save_pretrained(tmp_path / "export", max_shard_size="20KB")
    original = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    if ours.config.tie_word_embeddings:
        original.pop("lm_head.weight", None)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # transformers loads it as the same class with the same config, and the same logits bit for bit
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded) is type(theirs)
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(theirs).__name__]
    theirs_config = {k: v for k, v in theirs.config.to_dict().items() if k not in ("_name_or_path", "dtype")}
    assert {k: v for k, v in reloaded.config.to_dict().items() if k in theirs_config} == theirs_config
    ids = random_ids(1, SEQ, FAMILY_TINY["vocab_size"])
    assert torch.equal(hf_logits(reloaded, ids), hf_logits(theirs, ids))
    again = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(), strict=True))


# ---- presets and their YAML -----------------------------------------------------------------------

# The public config.json of each model (transformers 4.x form), as published on the hub.
REAL_CONFIGS = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "initializer_range": 0.02,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "model_type": "qwen3",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
    "mistral-7b-v0.1": {
        "architectures": ["MistralForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.34.0.dev0",
        "use_cache": True,
        "vocab_size": 32000,
    },
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "initializer_range": 0.02,
        "intermediate_size": 14336,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0",
        "use_cache": True,
        "vocab_size": 128256,
    },
}
# Parameter counts of the published models (tied embeddings counted once).
PARAMETERS = {
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen3-0.6b": 596_049_920,
    "qwen3-1.7b": 1_720_574_976,
    "mistral-7b-v0.1": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "llama-3.1-8b": 8_030_261_248,
}


@pytest.mark.parametrize("preset", list(REAL_CONFIGS))
def test_real_config_json_gives_the_preset_and_is_written_back(preset):
    real = REAL_CONFIGS[preset]
    config = config_from_hf(real)
    assert config == get_preset(preset)
    written = config_to_hf(config, torch.bfloat16)
    ignored = {"transformers_version", "use_mrope"}  # nothing reads them
    assert {k: written.get(k) for k in real if k not in ignored} == {k: v for k, v in real.items() if k not in ignored}


@pytest.mark.parametrize("preset", list(PARAMETERS))
def test_presets_have_the_shapes_of_transformers_and_their_flops(preset):
    config = get_preset(preset)
    hf_config = transformers.AutoConfig.for_model(**config_to_hf(config))
    family = get_model_family(config_to_hf(config)["model_type"])
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = family.build(config)
    shapes = {
        k: tuple(v.shape)
        for k, v in theirs.state_dict().items()
        if k != "lm_head.weight" or not hf_config.tie_word_embeddings
    }
    assert {family_key(k): tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
    assert sum(p.numel() for p in ours.parameters()) == PARAMETERS[preset]
    assert family.num_parameters(config) == PARAMETERS[preset]  # counted without building the model
    embedding = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    assert family.flops_per_token(ours) == 6 * (PARAMETERS[preset] - embedding)


def family_key(name: str) -> str:
    from nemo_lite.components.models.hf import to_hf_key

    return to_hf_key(name)


def test_every_model_yaml_composes_and_names_a_preset():
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from nemo_lite.training.config import register_schema

    register_schema()
    configs = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.stem for p in (configs / "model").glob("*.yaml"))
    assert set(names) == set(list_presets())  # one namespace: every preset has its YAML, and only presets do
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        for name in names:
            model = OmegaConf.to_object(compose(config_name="finetune", overrides=[f"model={name}"])).model
            assert model.preset == name
            if name in PARAMETERS:  # the hub id of the same model
                assert model.pretrained_path.split("/")[1].lower() == name, name


# ---- the finetune recipe on each family -----------------------------------------------------------


@pytest.mark.parametrize(
    "variant,backend", [("llama", "sdpa"), ("qwen2", "varlen"), ("qwen3", "eager"), ("mistral", "flex")]
)
def test_finetune_recipe_runs_and_exports(variant, backend, tmp_path):
    from nemo_lite.training.config import RecipeConfig
    from nemo_lite.training.trainer import Trainer

    ckpt = tmp_path / "ckpt"
    eos = save_default_tokenizer(ckpt)
    theirs = family_hf_model(variant, seed=4, vocab_size=8192, bos_token_id=eos, eos_token_id=eos)
    theirs.save_pretrained(ckpt)
    cfg = RecipeConfig(recipe="finetune")
    cfg.run_dir = str(tmp_path / "run")
    cfg.model.pretrained_path = str(ckpt)
    cfg.attention.backend = backend
    cfg.data.tokenizer = "model"
    cfg.data.seq_len, cfg.data.batch_size, cfg.data.validation_fraction = 32, 2, 0.0
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 1
    t = cfg.trainer
    t.max_steps, t.val_every, t.save_every, t.sample_tokens, t.progress_bar = 3, 0, 0, 0, False
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.status == "completed" and len(result.losses) == 3
    assert trainer.family.name == variant and trainer.tokenizer.eos_token_id == eos
    exported = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir).eval()
    assert type(exported) is type(theirs)
    assert (result.hf_dir / "tokenizer.json").is_file()
    ours = AutoModelForCausalLM.from_pretrained(result.hf_dir, attention=AttentionConfig(backend="eager"))
    ids = random_ids(1, SEQ, 8192)
    with torch.no_grad():
        assert (ours(ids) - exported(ids).logits).abs().max().item() <= 1e-4
        assert not torch.equal(exported(ids).logits, theirs(ids).logits)  # it was trained


# ---- bad input: one line each, naming the value and what to do ------------------------------------

BASE = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8}
BASE.update(num_hidden_layers=2, num_attention_heads=2)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "rope_type='longrope' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "mscale": 1, "mscale_all_dim": 1}}, "mscale"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
        ({"mlp_dropout": 0.1}, "mlp_dropout=0.1 is not supported"),
        (
            {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
            "rope_parameters is given per layer type .full_attention.",
        ),
        ({"layer_types": ["full_attention", "chunked_attention"]}, "layer_types ['chunked_attention']"),
        ({"use_sliding_window": True, "sliding_window": 1}, "sliding_window=1 is not supported"),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window=0 is not supported"),
        ({"model_type": "mistral", "layer_types": ["full_attention"] * 2}, "layer_types is not supported"),
        (
            {"model_type": "gpt2"},
            "model_type='gpt2' is not supported; accepted model_type: gpt_oss, llama, mistral, mixtral, qwen2, qwen3",
        ),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config is not supported"),
    ],
)
def test_unsupported_config_values_are_refused_in_one_line(edit, message):
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        config_from_hf({**BASE, **edit})
    assert "\n" not in str(err.value)


def test_missing_keys_take_each_familys_transformers_defaults():
    for model_type, cls in [("qwen2", "Qwen2Config"), ("qwen3", "Qwen3Config"), ("mistral", "MistralConfig")]:
        ours = config_from_hf({**BASE, "model_type": model_type})
        theirs = getattr(transformers, cls)(**{k: v for k, v in BASE.items() if k != "model_type"})
        # Qwen2Config has no head_dim field: its attention uses hidden_size // num_attention_heads
        assert ours.head_dim == getattr(theirs, "head_dim", None) or BASE["hidden_size"] // BASE["num_attention_heads"]
        for key in ("max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id"):
            assert getattr(ours, key) == getattr(theirs, key), (model_type, key)
        assert ours.layer_windows() == (0, 0) or model_type == "mistral"
    assert config_from_hf({**BASE, "model_type": "mistral"}).layer_windows() == (4095, 4095)  # transformers: 4096


def test_unknown_model_type_and_the_wrong_class_say_what_to_do(checkpoints, tmp_path):
    cfg = json.loads((checkpoints["qwen2"][1] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(UnknownModelTypeError, match="model_type='gpt2' is not supported; supported: gpt_oss, llama"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"accepted model_type: llama \(AutoModelForCausalLM also loads"):
        LlamaForCausalLM.from_pretrained(checkpoints["qwen3"][1])
    with pytest.raises(TypeError, match="Qwen2ForCausalLM takes a Qwen2Config, got a LlamaConfig"):
        Qwen2ForCausalLM(get_preset("tiny"))


# ---- GPU: the kernels themselves apply the windows -------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["qwen2_window", "qwen3", "mistral"])
def test_gpu_kernels_match_transformers_and_train(variant, checkpoints):
    """On CUDA the backends run their kernels (compiled flex, FlashAttention varlen with window_size):
    float32 flex against transformers; bfloat16 packed batches of every backend against the eager math;
    a backward through each."""
    theirs, path = checkpoints[variant]
    theirs = theirs.cuda()
    vocab = FAMILY_TINY["vocab_size"]
    ids = random_ids(2, 256, vocab, seed=7).cuda()
    flex = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend="flex"), device="cuda")
    with torch.no_grad():
        diff = (flex(ids) - theirs(ids).logits).abs().max().item()
    _report(f"{variant} flex float32 on CUDA", diff)
    assert diff <= 1e-4

    ids[:, ::37] = EOS  # documents of 37 tokens, longer than the windows
    reference = AutoModelForCausalLM.from_pretrained(
        path, attention=AttentionConfig(backend="eager", attn_mask_type="block_causal"), device="cuda"
    )
    with torch.no_grad():
        expected = reference(ids, attention_mask=reference.build_attention_mask(ids))
    errors = {}
    for backend in list_attention_backends():
        model = AutoModelForCausalLM.from_pretrained(
            path,
            attention=AttentionConfig(backend=backend, attn_mask_type="block_causal"),
            dtype=torch.bfloat16,
            device="cuda",
        )
        logits = model(ids, attention_mask=model.build_attention_mask(ids))
        logits.float().square().mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        errors[backend] = (logits.detach().float() - expected).abs().max().item()
        _report(f"{variant} {backend} bfloat16 packed on CUDA vs float32", errors[backend])
    # bfloat16 rounding only: a window or a document boundary applied wrongly would be an O(1) error
    for backend, error in errors.items():
        assert error <= max(2 * errors["eager"], 0.05), backend


# ---- parameter and attention FLOP counts from the family ------------------------------------------


@pytest.mark.parametrize("variant", list(FAMILY_VARIANTS))
@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"num_key_value_heads": 6}])
def test_num_parameters_counts_what_the_model_builds(variant, extra):
    """Biases, per-head q/k norms, tied or untied heads, GQA or not: the family's count without building equals
    the built model's."""
    _, _, fields = FAMILY_VARIANTS[variant]
    family = get_model_family(variant.removesuffix("_window"))
    config = family.config_cls(**{**FAMILY_TINY, **fields, **extra})
    model = family.build(config)
    assert family.num_parameters(config) == sum(p.numel() for p in model.parameters())


def test_attention_flops_count_each_layers_window():
    """A Mistral-like config past its window: every layer counts only the pairs the window allows (fewer than
    causal); a Qwen2 config with one sliding layer of two counts one layer of each. Both against the dense
    masks the backends compute."""
    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.components.attention.masks import dense_mask

    seq, window = 32, 8  # Hugging Face's sliding_window = 8: a query sees keys with q - k < 8
    ids = torch.tensor([[5] * 20 + [EOS] + [5] * 11, [5] * seq])
    mistral = get_model_family("mistral")
    config = mistral.config_cls(**{**FAMILY_TINY, "sliding_window": window, "num_hidden_layers": 3})
    per_pair = 3 * 4 * config.head_dim * config.num_attention_heads
    for mask_type in ("causal", "block_causal"):
        attention = AttentionConfig(attn_mask_type=mask_type)
        mask = mistral.build(config, attention=attention).build_attention_mask(ids)
        doc_ids = mask.doc_ids
        windowed = int(dense_mask(seq, doc_ids_BS=doc_ids, sliding_window=window - 1).expand(2, 1, seq, seq).sum())
        full = int(dense_mask(seq, doc_ids_BS=doc_ids).expand(2, 1, seq, seq).sum())
        flops = mistral.attention_flops(config, mask)
        assert flops.dtype == torch.float64 and flops.dim() == 0
        assert int(flops) == per_pair * 3 * windowed < per_pair * 3 * full

    qwen2 = get_model_family("qwen2")
    fields = dict(use_sliding_window=True, sliding_window=window, max_window_layers=1, num_hidden_layers=2)
    config = qwen2.config_cls(**{**FAMILY_TINY, **fields})
    mask = qwen2.build(config).build_attention_mask(ids)
    windowed = int(dense_mask(seq, sliding_window=window - 1).sum()) * 2
    full = int(dense_mask(seq).sum()) * 2
    assert int(qwen2.attention_flops(config, mask)) == per_pair * (windowed + full)
