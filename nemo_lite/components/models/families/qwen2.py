"""The qwen2 family: Qwen2 and Qwen2.5, the shared decoder with biases on q, k and v.

Also the sliding windows Qwen checkpoints may ask for (``use_sliding_window``, ``layer_types``,
``max_window_layers``), which the later Qwen generation's family imports from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_lite.components.models.decoder import DecoderConfig, DecoderForCausalLM, decoder_family, window_from_hf
from nemo_lite.components.models.family import HFFacts, register_model_family

# Per-layer attention kinds of layer_types.
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(kw_only=True)
class QwenWindows:
    """Qwen's optional sliding windows (in Qwen2 checkpoints and later ones, as transformers reads them)."""

    # Whether sliding_window applies at all; False (every released Qwen2.5 model and later) = full attention.
    use_sliding_window: bool = False
    # Hugging Face's window W: a query sees keys with q - k < W. None = no window.
    sliding_window: int | None = None
    # Without layer_types: layers with index >= max_window_layers slide, the ones below do not.
    max_window_layers: int = 28
    # Per layer "full_attention" or "sliding_attention"; None = derived from max_window_layers.
    layer_types: list[str] | None = None

    def layer_windows(self) -> tuple[int, ...]:
        # transformers drops the window unless use_sliding_window, whatever layer_types says.
        window = window_from_hf(self.sliding_window, "sliding_window") if self.use_sliding_window else 0
        kinds = self.layer_types or [
            "sliding_attention" if i >= self.max_window_layers else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        return tuple(window if kind == "sliding_attention" else 0 for kind in kinds)

    def check_windows(self) -> None:
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer_types {unknown} are not supported; supported: {', '.join(LAYER_TYPES)}")
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}"
                )
        if self.use_sliding_window:
            window_from_hf(self.sliding_window, "sliding_window")


@dataclass(kw_only=True)
class Qwen2Config(QwenWindows, DecoderConfig):
    """Qwen2 and Qwen2.5: biases on q, k and v (not on o), no MLP bias."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_windows()

    @property
    def qkv_bias(self) -> bool:
        return True


class Qwen2ForCausalLM(DecoderForCausalLM):
    """Qwen2 and Qwen2.5: biases on q, k and v; optional sliding windows in the upper layers."""

    config_class = Qwen2Config


PRESETS: dict[str, Qwen2Config] = {
    # Qwen/Qwen2.5-0.5B
    "qwen2.5-0.5b": Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=24,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    # Qwen/Qwen2.5-1.5B
    "qwen2.5-1.5b": Qwen2Config(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=131072,
        max_window_layers=28,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
}

# transformers' Qwen2Config defaults of the keys a config.json may lack.
QWEN_DEFAULTS = dict(max_position_embeddings=32768, sliding_window=4096, max_window_layers=28)

HF = HFFacts(model_types=("qwen2",), architecture="Qwen2ForCausalLM", defaults=QWEN_DEFAULTS)

FAMILY = register_model_family(decoder_family("qwen2", Qwen2ForCausalLM, PRESETS, HF))
