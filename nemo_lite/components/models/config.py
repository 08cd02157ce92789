"""The Llama decoder's configuration and its named presets.

Field names follow Hugging Face's ``LlamaConfig`` so that a ``config.json`` maps onto them one to one
(the mapping itself lives in :mod:`nemo_lite.components.models.hf`).

    config = get_preset("llama-3.2-1b")              # nemo_lite.components.models.get_preset: exact names
    config = get_preset("tiny", num_hidden_layers=4)   # a copy with fields replaced
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(kw_only=True)
class RopeScaling:
    """Llama 3 frequency scaling of the rotary embedding (``rope_type="llama3"`` in Hugging Face).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are divided by
    ``factor``, those shorter than ``original_max_position_embeddings / high_freq_factor`` are kept,
    and the band in between is interpolated smoothly.
    """

    # Only "llama3" is implemented; "default" (no scaling) is expressed as ``rope_scaling=None``.
    rope_type: str = "llama3"
    # Divisor of the low frequencies (Llama 3.1: 8, Llama 3.2: 32).
    factor: float
    # Wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled.
    low_freq_factor: float = 1.0
    # Wavelengths below original_max_position_embeddings / high_freq_factor are not scaled.
    high_freq_factor: float = 4.0
    # The context length the model was pretrained with before the scaling.
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type != "llama3":
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; supported: 'llama3' "
                "(use rope_scaling=None for the default rotary embedding)"
            )
        if self.factor <= 0 or self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor, got {self}")


@dataclass(kw_only=True)
class LlamaConfig:
    """Shape and numerics of a Llama-style decoder (pre-norm, RMSNorm, RoPE, GQA, SwiGLU)."""

    # Number of token ids (rows of the embedding and of the output projection).
    vocab_size: int
    # Width of the residual stream.
    hidden_size: int
    # Width of the SwiGLU MLP's gate/up projections.
    intermediate_size: int
    # Number of decoder blocks.
    num_hidden_layers: int
    # Number of query heads.
    num_attention_heads: int
    # Number of key/value heads (grouped-query attention); must divide num_attention_heads.
    # None means num_attention_heads (multi-head attention).
    num_key_value_heads: int | None = None
    # Width of one attention head; None means hidden_size // num_attention_heads. May differ from
    # that ratio: q/k/v project to num_heads * head_dim and o_proj projects back to hidden_size.
    head_dim: int | None = None
    # Longest context the model is meant for (recorded in config.json; nothing is precomputed for it).
    max_position_embeddings: int = 2048
    # Epsilon inside RMSNorm's rsqrt.
    rms_norm_eps: float = 1e-5
    # Base of the rotary embedding's wavelengths.
    rope_theta: float = 10000.0
    # Frequency scaling of the rotary embedding; None = default RoPE. A dict is converted.
    rope_scaling: RopeScaling | None = None
    # Share the token embedding with the output projection (no separate lm_head weight).
    tie_word_embeddings: bool = False
    # Biases on the q/k/v/o projections.
    attention_bias: bool = False
    # Biases on the gate/up/down projections of the MLP.
    mlp_bias: bool = False
    # Beginning-of-sequence id of the checkpoint's tokenizer (recorded in config.json).
    bos_token_id: int | None = None
    # End-of-sequence id; delimits packed documents (block_causal masks) when no other is given.
    eos_token_id: int | None = None
    # Padding id of the tokenizer (recorded in config.json; nothing here depends on it).
    pad_token_id: int | None = None
    # Standard deviation of the normal init of init_weights() (and of Hugging Face's init).
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                    f"{self.num_attention_heads}: set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for the rotary embedding, got {self.head_dim}")


LLAMA_PRESETS: dict[str, LlamaConfig] = {
    # A test model: runs in milliseconds on a CPU.
    "tiny": LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # HuggingFaceTB/SmolLM2-135M-Instruct (the checkpoint scripts/convert_smollm2.py produces);
    # eos is <|im_end|> = 2 as in the Instruct model's config.
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}


def config_fields() -> list[str]:
    """Names of every LlamaConfig field, in declaration order."""
    return [f.name for f in dataclasses.fields(LlamaConfig)]


__all__ = ["LLAMA_PRESETS", "LlamaConfig", "RopeScaling", "config_fields"]
