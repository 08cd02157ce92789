"""The qwen3 family: the shared decoder with an RMSNorm on each head of q and k before the rotary
embedding, a head_dim of its own, and Qwen's optional sliding windows (from ``families/qwen2.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from nemo_lite.components.models.decoder import DecoderConfig, DecoderForCausalLM, decoder_family
from nemo_lite.components.models.families.qwen2 import QWEN_DEFAULTS, QwenWindows
from nemo_lite.components.models.family import HFFacts, register_model_family


@dataclass(kw_only=True)
class Qwen3Config(QwenWindows, DecoderConfig):
    """Qwen3: RMSNorm on each head of q and k before the rotary embedding; head_dim set on its own."""

    # Biases on the q/k/v/o projections (False in every released Qwen3 model).
    attention_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_windows()

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return True


class Qwen3ForCausalLM(DecoderForCausalLM):
    """Qwen3: per-head RMSNorm on q and k before the rotary embedding; optional sliding windows."""

    config_class = Qwen3Config


PRESETS: dict[str, Qwen3Config] = {
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=28,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # Qwen/Qwen3-1.7B
    "qwen3-1.7b": Qwen3Config(
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=28,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
}

HF = HFFacts(
    model_types=("qwen3",),
    architecture="Qwen3ForCausalLM",
    defaults=dict(QWEN_DEFAULTS, head_dim=128),  # transformers' Qwen3Config
)

FAMILY = register_model_family(decoder_family("qwen3", Qwen3ForCausalLM, PRESETS, HF))
