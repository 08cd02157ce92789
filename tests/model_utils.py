"""Helpers for the model tests: tiny configs for both libraries, random weights, packed batches."""

from __future__ import annotations

import torch
from torch import nn

from nemo_lite.components.attention import AttentionConfig
from nemo_lite.components.models import LlamaConfig, RopeScaling

EOS = 2

# A tiny architecture, spelled with Hugging Face's field names (ours are the same).
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=EOS,
)
# llama3 scaling with a short original context, so test positions (>= 100) lie beyond it and the
# head's wavelengths (6 .. ~20000) fall in all three bands (kept, smoothed, divided by factor).
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)

VARIANTS = {
    "tied": {},
    "untied": {"tie_word_embeddings": False},
    "attention_bias": {"attention_bias": True},
    "mlp_bias": {"mlp_bias": True, "tie_word_embeddings": False},
    "llama3_rope": {"rope": LLAMA3_ROPE},
    "head_dim_32": {"head_dim": 32},  # hidden / heads = 16
    "mha": {"num_key_value_heads": 4},
}


def ours_config(variant: str) -> LlamaConfig:
    fields = {**TINY, **VARIANTS[variant]}
    rope = fields.pop("rope", None)
    return LlamaConfig(**fields, rope_scaling=RopeScaling(**rope) if rope else None)


def hf_config(variant: str):
    """The same architecture as a transformers LlamaConfig, written independently of hf.py."""
    import transformers

    fields = {**TINY, **VARIANTS[variant]}
    rope = fields.pop("rope", None)
    theta = fields.pop("rope_theta")
    rope_parameters = {"rope_type": "default", "rope_theta": theta}
    if rope:
        rope_parameters = {"rope_type": "llama3", "rope_theta": theta, **rope}
    return transformers.LlamaConfig(**fields, rope_parameters=rope_parameters)


def hf_model(variant: str, seed: int = 0):
    import transformers

    # eager: transformers' readable float32 reference
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant), attn_implementation="eager").eval()
    randomize_(model, seed)
    return model


def tiny_twins(**overrides):
    """Two block-causal sdpa models of the TINY shape (with ``overrides``) holding the same initial weights."""
    from nemo_lite.components.models import LlamaForCausalLM

    config = LlamaConfig(**{**TINY, **overrides})
    first = LlamaForCausalLM(config, attention=AttentionConfig(backend="sdpa", attn_mask_type="block_causal"))
    first.init_weights(seed=0)
    second = LlamaForCausalLM(config, attention=AttentionConfig(backend="sdpa", attn_mask_type="block_causal"))
    second.load_state_dict(first.state_dict())
    return first, second


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (norm weights around 1, biases non-zero) so that every tensor's
    mapping matters: a default init has unit norms and zero biases, which would hide mistakes."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():  # a tied weight is listed once
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return module


def random_ids(batch: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """Token ids that avoid 0..2 (pad/bos/eos)."""
    return torch.randint(3, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def pack(docs_per_row: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[list[slice]]]:
    """Concatenate documents into rows: ids ``[B, S]``, positions restarting per document, and each
    document's slice. Rows must come out the same length."""
    rows, positions, slices = [], [], []
    for docs in docs_per_row:
        start, row_slices = 0, []
        for doc in docs:
            row_slices.append(slice(start, start + len(doc)))
            start += len(doc)
        rows.append(torch.cat(docs))
        positions.append(torch.cat([torch.arange(len(doc)) for doc in docs]))
        slices.append(row_slices)
    return torch.stack(rows), torch.stack(positions), slices


# ---- the other families, as transformers builds them -------------------------------------------------

# Odd shapes on purpose: head_dim 16 != hidden 48 / 6 heads, GQA 3:1 (6 query heads, 2 KV heads).
FAMILY_TINY = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=EOS,
)
# Each family with what sets it apart; "qwen2_window" honours use_sliding_window/max_window_layers
# (the upper layer slides, the lower does not); Mistral's window (5) is shorter than the test
# sequences and than most test documents.
FAMILY_VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2_window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=5)),
}


def family_hf_model(variant: str, seed: int = 0, **overrides):
    """A random-weight transformers model of the variant (float32, eager attention: the reference)."""
    import transformers

    config_name, model_name, fields = FAMILY_VARIANTS[variant]
    config = getattr(transformers, config_name)(**{**FAMILY_TINY, **fields, **overrides})
    config._attn_implementation = "eager"
    model = getattr(transformers, model_name)(config).eval()
    return randomize_(model, seed)


def hf_logits(model, ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        if positions is None:
            return model(ids).logits
        return model(ids, position_ids=positions.expand(ids.shape[0], -1)).logits


def save_default_tokenizer(path) -> int:
    """The default corpus tokenizer (vocabulary 8192) saved into ``path``; returns its EOS id."""
    from nemo_lite.components.datasets.tokenizer import build_tokenizer

    tokenizer = build_tokenizer("default")
    tokenizer.save_pretrained(str(path))
    return tokenizer.eos_token_id


def packed_documents_diff(theirs, path, backend: str, vocab: int) -> float:
    """Five documents packed into two EOS-delimited rows (one row ending inside a document, one holding a lone
    EOS), through nemo_lite's model from ``path`` with block-causal masks on ``backend``, against the
    transformers model ``theirs`` on each document alone: the largest |logit| difference."""
    from nemo_lite.components.models import AutoModelForCausalLM

    eos = torch.tensor([EOS])
    d = [random_ids(1, n, vocab, seed=n)[0] for n in (7, 12, 3, 9, 13)]
    ids, positions, slices = pack(
        [[torch.cat([d[0], eos]), torch.cat([d[1], eos]), d[2]], [torch.cat([d[3], eos]), eos, d[4]]]
    )
    ours = AutoModelForCausalLM.from_pretrained(
        path, attention=AttentionConfig(backend=backend, attn_mask_type="block_causal")
    )
    with torch.no_grad():
        out = ours(ids, position_ids=positions, attention_mask=ours.build_attention_mask(ids))
        return max(
            (out[row : row + 1, sl] - theirs(ids[row : row + 1, sl]).logits).abs().max().item()
            for row, row_slices in enumerate(slices)
            for sl in row_slices
        )
