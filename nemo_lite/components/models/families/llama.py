"""The llama family: Llama 2/3 and the Llama-architecture checkpoints (SmolLM2, ...), and the test presets.

One file holds the family: its config class and presets, its model class, its Hugging Face facts and its
registration (the ``families`` package imports every module in it).
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_lite.components.models.decoder import DecoderConfig, DecoderForCausalLM, RopeScaling, decoder_family
from nemo_lite.components.models.family import HFFacts, register_model_family


@dataclass(kw_only=True)
class LlamaConfig(DecoderConfig):
    """Llama (and the Llama-architecture checkpoints: SmolLM2, ...)."""

    # Biases on the q/k/v/o projections.
    attention_bias: bool = False
    # Biases on the gate/up/down projections of the MLP.
    mlp_bias: bool = False

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias


class LlamaForCausalLM(DecoderForCausalLM):
    """Llama: biases on q/k/v/o and on the MLP if the config says so (``attention_bias``, ``mlp_bias``)."""

    config_class = LlamaConfig


# ---- presets: the public config.json of each model (docs/models.md says which) ------------------------

PRESETS: dict[str, LlamaConfig] = {
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
    # A small model trained from scratch in minutes on a CPU (the pretraining recipe's default; the recipe
    # takes the vocabulary from the tokenizer).
    "small": LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
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
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": LlamaConfig(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
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
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        tie_word_embeddings=False,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
}

HF = HFFacts(
    model_types=("llama",),
    architecture="LlamaForCausalLM",
    # transformers' LlamaConfig defaults
    defaults=dict(max_position_embeddings=2048, bos_token_id=1, eos_token_id=2),
    extras=dict(pretraining_tp=1),
)

FAMILY = register_model_family(decoder_family("llama", LlamaForCausalLM, PRESETS, HF))
