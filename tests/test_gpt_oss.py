"""The gpt_oss family against transformers' GptOssForCausalLM (float32, CPU, odd shapes): sinks, alternating
sliding windows, attention biases, the clamped SwiGLU with expert biases, top-k-then-softmax routing, YaRN;
MXFP4 checkpoints dequantized on loading."""

from __future__ import annotations

import json

import pytest
import torch
from model_utils import EOS, packed_documents_diff, random_ids, randomize_, save_default_tokenizer
from safetensors.torch import load_file, save_file

from nemo_lite.components.attention import AttentionConfig, AttentionConfigError, get_attention_backend
from nemo_lite.components.models import AutoModelForCausalLM, get_model_family, get_preset
from nemo_lite.components.models.families.gpt_oss import GptOssConfig, GptOssForCausalLM
from nemo_lite.components.models.hf import FP4_E2M1_VALUES, dequantize_mxfp4, hf_layout
from nemo_lite.components.models.moe import num_parameters

transformers = pytest.importorskip("transformers")

SEQ = 19
SINK_BACKENDS = [name for name in ("eager", "sdpa", "flex") if get_attention_backend(name).supports_sinks]
# Odd on purpose: head_dim 10, 5 experts of width 24 (interleaved gate/up), top-2, a window of 4 on the
# sliding layers (shorter than the sequences and most documents), a clamp the activations reach, YaRN.
TINY = dict(
    vocab_size=97,
    hidden_size=40,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
    num_local_experts=5,
    num_experts_per_tok=2,
    sliding_window=4,
    swiglu_limit=0.8,
    output_router_logits=True,
    router_aux_loss_coef=0.05,
    rope_parameters={
        "rope_type": "yarn",
        "factor": 4.0,
        "beta_fast": 8.0,
        "beta_slow": 1.0,
        "original_max_position_embeddings": 16,
        "rope_theta": 1000.0,
        "truncate": False,
    },
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
)


def hf_gpt_oss(seed: int = 0, **overrides):
    config = transformers.GptOssConfig(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return randomize_(transformers.GptOssForCausalLM(config).eval(), seed)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    theirs = hf_gpt_oss(seed=1)
    path = tmp_path_factory.mktemp("gpt_oss")
    theirs.save_pretrained(path, max_shard_size="30KB")
    return theirs, path


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_gpt_oss_logits_and_aux_loss_equal_transformers(backend, checkpoint):
    theirs, path = checkpoint
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend=backend))
    assert type(ours) is GptOssForCausalLM and ours.sliding_windows == (0, 3)
    assert ours.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    ids = random_ids(2, SEQ, TINY["vocab_size"])
    with torch.no_grad():
        out = theirs(ids, labels=ids)
        diff = (ours(ids) - out.logits).abs().max().item()
    print(f"\n[parity] gpt_oss {backend}: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-4
    torch.testing.assert_close(ours.load_balancing_loss(), out.aux_loss, rtol=1e-6, atol=1e-7)


def test_a_backend_without_sinks_is_refused_in_one_line(checkpoint):
    with pytest.raises(AttentionConfigError, match=r"this model has attention sinks, which attention=varlen cannot"):
        AutoModelForCausalLM.from_pretrained(checkpoint[1], attention=AttentionConfig(backend="varlen"))


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_gpt_oss_packed_documents_equal_each_document_alone(backend, checkpoint):
    """Sinks, windows and block_causal together: each document's logits are transformers' on it alone."""
    theirs, path = checkpoint
    diff = packed_documents_diff(theirs, path, backend, TINY["vocab_size"])
    print(f"\n[parity] gpt_oss {backend} packed vs alone: max |dlogit| = {diff:.2e}")
    assert diff <= 1e-4


def test_gpt_oss_gradients_equal_transformers_sinks_and_router_included(checkpoint):
    theirs, path = checkpoint
    ours = AutoModelForCausalLM.from_pretrained(path, attention=AttentionConfig(backend="eager"))
    ids = random_ids(2, SEQ, TINY["vocab_size"], seed=5)
    theirs.zero_grad(set_to_none=True)
    theirs(ids[:, :-1], labels=ids[:, :-1]).loss.backward()
    logits = torch.nn.functional.linear(ours.forward_hidden(ids[:, :-1]), ours.output_weight)[:, :-1]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:-1].reshape(-1))
    (ce + ours.auxiliary().loss).backward()
    names = {ours_name: hf_name for hf_name, (ours_name, *_) in hf_layout(
        {n: tuple(p.shape) for n, p in ours.named_parameters()}, get_model_family("gpt_oss")
    ).items()}  # fmt: skip
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        want = theirs_grads[names[name]].grad
        rel = ((p.grad - want).norm() / want.norm().clamp(min=1e-12)).item()
        assert rel <= 1e-4, (name, rel)
    assert len(names) == len(theirs_grads)
    assert ours.layers[0].attention.sinks.grad.abs().max() > 0


def test_gpt_oss_export_round_trips_bitwise(checkpoint, tmp_path):
    theirs, path = checkpoint
    ours = AutoModelForCausalLM.from_pretrained(path)
    out = ours.save_pretrained(tmp_path / "export", max_shard_size="30KB")
    original = {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}
    exported = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert type(reloaded) is type(theirs)
    for key in ("num_local_experts", "layer_types", "sliding_window", "swiglu_limit", "rope_parameters"):
        assert getattr(reloaded.config, key) == getattr(theirs.config, key), key
    ids = random_ids(1, SEQ, TINY["vocab_size"])
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, theirs(ids).logits)


# ---- MXFP4 ---------------------------------------------------------------------------------------


def _mxfp4_by_hand(blocks, scales):
    """The format's definition, one element at a time: ``[E, out, in]``."""
    experts, rows, groups, width = blocks.shape
    out = torch.empty(experts, rows, groups * width * 2)
    for e in range(experts):
        for r in range(rows):
            for g in range(groups):
                scale = 2.0 ** (int(scales[e, r, g]) - 127)
                for j in range(width):
                    byte = int(blocks[e, r, g, j])
                    out[e, r, g * 2 * width + 2 * j] = FP4_E2M1_VALUES[byte & 15] * scale
                    out[e, r, g * 2 * width + 2 * j + 1] = FP4_E2M1_VALUES[byte >> 4] * scale
    return out


def _random_mxfp4(experts: int, rows: int, inputs: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, inputs // 32, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 130, (experts, rows, inputs // 32), generator=gen, dtype=torch.uint8)
    return blocks, scales


def test_mxfp4_dequantizes_as_the_format_defines_and_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4(2, 3, 64, seed=0)
    ours = dequantize_mxfp4(blocks, scales)
    assert torch.equal(ours, _mxfp4_by_hand(blocks, scales).transpose(1, 2))
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))


def test_an_mxfp4_checkpoint_loads_dequantized(tmp_path):
    """A tiny checkpoint in the published layout (expert weights as _blocks + _scales, a quantization_config):
    loads into bf16 with the dequantized experts, and gives transformers' logits on the same dense weights."""
    theirs = hf_gpt_oss(seed=2, hidden_size=64, intermediate_size=32, head_dim=16)
    theirs.save_pretrained(tmp_path / "dense")
    tensors = load_file(tmp_path / "dense" / "model.safetensors")
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    for i in range(config["num_hidden_layers"]):
        for j, (name, rows, inputs) in enumerate([("gate_up_proj", 64, 64), ("down_proj", 64, 32)]):
            key = f"model.layers.{i}.mlp.experts.{name}"
            blocks, scales = _random_mxfp4(config["num_local_experts"], rows, inputs, seed=10 * i + j)
            del tensors[key]
            tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
            with torch.no_grad():
                getattr(theirs.model.layers[i].mlp.experts, name).copy_(dequantize_mxfp4(blocks, scales))
    (tmp_path / "mxfp4").mkdir()
    save_file(tensors, tmp_path / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "mxfp4" / "config.json").write_text(json.dumps(config))
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "mxfp4", dtype=torch.bfloat16)
    assert ours.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    want = theirs.model.layers[1].mlp.experts.down_proj
    assert torch.equal(ours.layers[1].mlp.experts.down_proj.float(), want)  # MXFP4 values are exact in bf16
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "mxfp4", attention=AttentionConfig(backend="eager"))
    ids = random_ids(1, SEQ, TINY["vocab_size"])
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max().item() <= 1e-4


# ---- presets and counts -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset,total,active", [("gpt-oss-20b", 20.9, 3.6), ("gpt-oss-120b", 116.8, 5.1)])
def test_gpt_oss_presets_have_the_published_sizes(preset, total, active):
    """The model card's totals (20.9B and 116.8B) and active counts (3.6B, 5.1B), and transformers' own count."""
    from nemo_lite.components.models.hf import config_to_hf

    config = get_preset(preset)
    assert config.layer_windows() == (127, 0) * (config.num_hidden_layers // 2)  # sliding 128, full, ...
    assert round(num_parameters(config) / 1e9, 1) == total
    # the card counts the active parameters without the embedding (as MFU's FLOPs do: a lookup, no matmul)
    embedding = config.vocab_size * config.hidden_size
    assert round((num_parameters(config, active=True) - embedding) / 1e9, 1) == active
    fields = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        theirs = transformers.GptOssForCausalLM(transformers.GptOssConfig(**fields))
    assert sum(p.numel() for p in theirs.parameters()) == num_parameters(config)


def test_num_parameters_counts_what_is_built():
    config = GptOssConfig(
        **{k: v for k, v in TINY.items() if k not in ("rope_parameters", "num_local_experts")}, num_experts=5
    )
    model = GptOssForCausalLM(config)
    assert get_model_family("gpt_oss").num_parameters(config) == sum(p.numel() for p in model.parameters())


# ---- training -----------------------------------------------------------------------------------------


def test_finetune_trains_gpt_oss_with_and_without_lora(tmp_path):
    from test_moe import _finetune_config

    from nemo_lite.training.trainer import Trainer

    ckpt = tmp_path / "ckpt"
    eos = save_default_tokenizer(ckpt)
    hf_gpt_oss(seed=4, vocab_size=8192, bos_token_id=eos, eos_token_id=eos).save_pretrained(ckpt)
    for peft in ("none", "lora"):
        cfg = _finetune_config(tmp_path / peft, ckpt, backend="flex", steps=2)
        cfg.peft.method = peft
        result = Trainer(cfg).fit()
        assert result.status == "completed" and len(result.losses) == 2
        exported = transformers.AutoModelForCausalLM.from_pretrained(result.hf_dir, experts_implementation="eager")
        assert type(exported).__name__ == "GptOssForCausalLM"


def test_lora_stores_the_frozen_experts_in_the_autocast_dtype():
    """On a GPU run (bf16 autocast) LoRA stores frozen weights in bf16: the stacked experts too, which are most of
    a mixture's weights (gpt-oss-20b's would not fit one GPU in float32)."""
    from nemo_lite.training.converters.lora import LoraConverter, PeftSection

    config = GptOssConfig(
        **{k: v for k, v in TINY.items() if k not in ("rope_parameters", "num_local_experts")}, num_experts=5
    )
    model = GptOssForCausalLM(config)
    model.init_weights(seed=0)
    converter = LoraConverter(PeftSection(method="lora", r=4, alpha=8.0), frozen_dtype=torch.bfloat16)
    converter.convert(model, get_model_family("gpt_oss"))
    experts = model.layers[0].mlp.experts
    assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.bfloat16
    assert not experts.gate_up_proj.requires_grad and model.layers[0].mlp.router.weight.dtype == torch.float32
    assert "q_proj" in converter.target_names
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the frozen linears are bf16 too: as the GPU run autocasts
        assert torch.isfinite(model(random_ids(1, 9, 97))).all()


def test_the_finetune_recipe_trains_gpt_oss_on_conversations_with_lora_from_a_hub_cache(tmp_path):
    """python recipes/finetune.py model.pretrained_path=org/name data=chat peft=lora, offline from a hub cache:
    the conversations rendered with the checkpoint's template, adapters trained, the merge loaded by transformers
    as gpt-oss with its sinks, experts and router as they were."""
    from test_hub import _finetune, cache_repo

    from nemo_lite.testing.preference import tiny_chat_checkpoint

    files = tmp_path / "files"
    tiny_chat_checkpoint(files)  # the chat tokenizer and template; its Llama weights are replaced below
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (files / name).unlink(missing_ok=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(files)
    vocab = 64 * -(-len(tokenizer) // 64)
    theirs = hf_gpt_oss(seed=5, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, max_position_embeddings=512)
    theirs.save_pretrained(files)
    cache_repo(tmp_path / "hub", "tiny-org/tiny-gpt-oss", files)
    done = _finetune(
        "model.pretrained_path=tiny-org/tiny-gpt-oss",
        "data=chat",
        "data.seq_len=128",
        "peft=lora",
        cache=tmp_path / "hub",
        run_dir=tmp_path / "run",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", experts_implementation="eager")
    assert type(merged).__name__ == "GptOssForCausalLM"
    before, after = theirs.state_dict(), merged.state_dict()
    for frozen in ("model.layers.0.self_attn.sinks", "model.layers.0.mlp.router.weight"):
        assert torch.equal(before[frozen], after[frozen]), frozen
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert merged.generation_config.eos_token_id is not None
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "hf").chat_template is not None
