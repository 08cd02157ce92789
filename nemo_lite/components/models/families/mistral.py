"""The mistral family: a Llama without biases whose every layer may attend within a sliding window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_lite.components.models.decoder import DecoderConfig, DecoderForCausalLM, decoder_family, window_from_hf
from nemo_lite.components.models.family import HFFacts, register_model_family


@dataclass(kw_only=True)
class MistralConfig(DecoderConfig):
    """Mistral: a Llama without biases whose every layer may attend within a sliding window."""

    # Hugging Face's window W: a query sees keys with q - k < W, in every layer. None = no window.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        window_from_hf(self.sliding_window, "sliding_window")

    def layer_windows(self) -> tuple[int, ...]:
        return (window_from_hf(self.sliding_window, "sliding_window"),) * self.num_hidden_layers


class MistralForCausalLM(DecoderForCausalLM):
    """Mistral: every layer attends within ``config.sliding_window`` tokens (when set)."""

    config_class = MistralConfig


PRESETS: dict[str, MistralConfig] = {
    # mistralai/Mistral-7B-v0.1: every layer attends within a 4096-token window.
    "mistral-7b-v0.1": MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # mistralai/Mistral-7B-v0.3: no window, a larger vocabulary and rope_theta.
    "mistral-7b-v0.3": MistralConfig(
        vocab_size=32768,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def check_config_json(hf: dict[str, Any]) -> None:
    """transformers' Mistral reads no per-layer kinds: a layer_types key would mean something else here."""
    from nemo_lite.components.models.hf import CheckpointError

    if hf.get("layer_types") is not None:
        raise CheckpointError(
            "layer_types is not supported in a mistral config.json (transformers' Mistral ignores it too: every "
            "layer uses sliding_window); remove it"
        )


HF = HFFacts(
    model_types=("mistral",),
    architecture="MistralForCausalLM",
    # transformers' MistralConfig defaults
    defaults=dict(max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2, sliding_window=4096),
    check=check_config_json,
)

FAMILY = register_model_family(decoder_family("mistral", MistralForCausalLM, PRESETS, HF))
