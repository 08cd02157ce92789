"""The decoder's configurations, one class per model family, and their named presets.

Field names follow Hugging Face's config classes (``LlamaConfig``, ``Qwen2Config``, ``Qwen3Config``,
``MistralConfig``) so that a ``config.json`` maps onto them one to one (the mapping itself lives in
:mod:`nemo_lite.components.models.hf`). Every family shares :class:`DecoderConfig`'s fields; each adds
only what its ``config.json`` has, and says through four properties how the shared decoder
(:mod:`nemo_lite.components.models.llama`) is built: ``qkv_bias``, ``o_bias``, ``qk_norm`` and
``layer_windows()``.

    config = get_preset("llama-3.2-1b")              # nemo_lite.components.models.get_preset: exact names
    config = get_preset("tiny", num_hidden_layers=4)   # a copy with fields replaced
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Rotary frequency scalings that are implemented, and the RopeScaling fields each one reads (the
# config.json keys besides rope_type and rope_theta). "default" (none) is expressed as rope_scaling=None.
ROPE_FIELDS: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(ROPE_FIELDS)
# Per-layer attention kinds of Qwen's layer_types.
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(kw_only=True)
class RopeScaling:
    """Frequency scaling of the rotary embedding (Hugging Face's ``rope_scaling`` / ``rope_parameters``).

    ``rope_type`` picks the rule, and with it the fields that are read (the others keep their defaults
    and are not written to config.json):

    - ``linear``: every frequency divided by ``factor`` (positions interpolated).
    - ``dynamic``: NTK scaling that depends on the sequence: when the longest position of a forward,
      ``L = max(position_ids) + 1``, exceeds ``max_position_embeddings`` (``M``), the base becomes
      ``rope_theta * (factor * L / M - (factor - 1)) ** (head_dim / (head_dim - 2))``; up to ``M`` it
      is the default rope. (transformers computes the same, but caches the frequencies of the longest
      sequence seen until a sequence no longer than ``M`` comes; ours is a function of each forward's
      positions, so it equals a fresh transformers model on every call.)
    - ``yarn``: frequencies blended between kept and divided by ``factor`` by a ramp over the
      dimensions between ``beta_fast`` and ``beta_slow`` rotations within
      ``original_max_position_embeddings``; cos and sin are multiplied by ``attention_factor``
      (default ``0.1 * ln(factor) + 1``).
    - ``llama3``: wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` are
      divided by ``factor``, those shorter than ``original_max_position_embeddings / high_freq_factor``
      are kept, and the band in between is interpolated smoothly.
    """

    # One of ROPE_TYPES. The default keeps RopeScaling(factor=...) meaning Llama 3 scaling.
    rope_type: str = "llama3"
    # linear, dynamic, yarn: the context extension; llama3: divisor of the low frequencies (Llama 3.1: 8).
    factor: float
    # llama3: wavelengths above original_max_position_embeddings / low_freq_factor are fully scaled.
    low_freq_factor: float = 1.0
    # llama3: wavelengths below original_max_position_embeddings / high_freq_factor are not scaled.
    high_freq_factor: float = 4.0
    # llama3, yarn: the context length the model was pretrained with before the scaling.
    original_max_position_embeddings: int = 8192
    # yarn: dimensions that turn more than beta_fast times in the original context are kept as they are.
    beta_fast: float = 32.0
    # yarn: dimensions that turn fewer than beta_slow times are fully divided by factor.
    beta_slow: float = 1.0
    # yarn: the multiplier of cos and sin; None = 0.1 * ln(factor) + 1 (1 when factor <= 1).
    attention_factor: float | None = None
    # yarn: round the ramp's ends outwards to whole dimensions (transformers' default).
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported; supported: default, "
                f"{', '.join(ROPE_TYPES)} (use rope_scaling=None for the default rotary embedding)"
            )
        if not self.factor > 0:
            raise ValueError(f"{self.rope_type} rope scaling needs factor > 0, got {self.factor}")
        if self.rope_type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {self}")
        if self.rope_type == "yarn" and self.beta_fast < self.beta_slow:
            raise ValueError(f"yarn rope scaling needs beta_fast >= beta_slow, got {self}")

    def fields_of_type(self) -> dict[str, object]:
        """The fields this rope_type reads, with their values (what config.json holds for it); yarn's
        optional ones only when they differ from transformers' defaults."""
        values = {name: getattr(self, name) for name in ROPE_FIELDS[self.rope_type]}
        if values.get("attention_factor", 0.0) is None:
            del values["attention_factor"]
        if values.get("truncate") is True:
            del values["truncate"]
        return {"rope_type": self.rope_type, **values}


@dataclass(kw_only=True)
class DecoderConfig:
    """Shape and numerics shared by every family of the decoder (pre-norm, RMSNorm, RoPE, GQA, SwiGLU).

    A family's config derives from this one, adds the fields its config.json has, and overrides the
    properties below that tell the shared decoder what to build.
    """

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
    # Longest context the model is meant for (recorded in config.json; dynamic rope scaling starts here).
    max_position_embeddings: int = 2048
    # Epsilon inside RMSNorm's rsqrt.
    rms_norm_eps: float = 1e-5
    # Base of the rotary embedding's wavelengths.
    rope_theta: float = 10000.0
    # Frequency scaling of the rotary embedding; None = default RoPE. A dict is converted.
    rope_scaling: RopeScaling | None = None
    # Share the token embedding with the output projection (no separate lm_head weight).
    tie_word_embeddings: bool = False
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

    # ---- what the shared decoder builds (a family overrides the ones it changes) -------------------

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k and v projections."""
        return False

    @property
    def o_bias(self) -> bool:
        """A bias on the attention's output projection."""
        return False

    @property
    def mlp_bias(self) -> bool:
        """Biases on the MLP's gate, up and down projections."""
        return False

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over each head of q and of k (weights of head_dim), before the rotary embedding."""
        return False

    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's sliding window in nemo_lite's convention (``q - k <= w``; 0 = none)."""
        return (0,) * self.num_hidden_layers


def _window_from_hf(sliding_window: int | None, field: str) -> int:
    """nemo_lite's window ``w`` (``q - k <= w``) of a Hugging Face ``sliding_window = W`` (``q - k < W``)."""
    if sliding_window is None:
        return 0
    if not isinstance(sliding_window, int) or sliding_window < 2:
        raise ValueError(
            f"{field}={sliding_window!r} is not supported: it must be an int >= 2 "
            "(a query sees keys with q - k < sliding_window), or None for no window"
        )
    return sliding_window - 1


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


@dataclass(kw_only=True)
class _QwenWindows:
    """Qwen's optional sliding windows (in Qwen2 and Qwen3 checkpoints, as transformers reads them)."""

    # Whether sliding_window applies at all; False (every released Qwen2.5/Qwen3 model) = full attention.
    use_sliding_window: bool = False
    # Hugging Face's window W: a query sees keys with q - k < W. None = no window.
    sliding_window: int | None = None
    # Without layer_types: layers with index >= max_window_layers slide, the ones below do not.
    max_window_layers: int = 28
    # Per layer "full_attention" or "sliding_attention"; None = derived from max_window_layers.
    layer_types: list[str] | None = None

    def layer_windows(self) -> tuple[int, ...]:
        # transformers drops the window unless use_sliding_window, whatever layer_types says.
        window = _window_from_hf(self.sliding_window, "sliding_window") if self.use_sliding_window else 0
        kinds = self.layer_types or [
            "sliding_attention" if i >= self.max_window_layers else "full_attention"
            for i in range(self.num_hidden_layers)
        ]
        return tuple(window if kind == "sliding_attention" else 0 for kind in kinds)

    def _check_windows(self) -> None:
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
            _window_from_hf(self.sliding_window, "sliding_window")


@dataclass(kw_only=True)
class Qwen2Config(_QwenWindows, DecoderConfig):
    """Qwen2 and Qwen2.5: biases on q, k and v (not on o), no MLP bias."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_windows()

    @property
    def qkv_bias(self) -> bool:
        return True


@dataclass(kw_only=True)
class Qwen3Config(_QwenWindows, DecoderConfig):
    """Qwen3: RMSNorm on each head of q and k before the rotary embedding; head_dim set on its own."""

    # Biases on the q/k/v/o projections (False in every released Qwen3 model).
    attention_bias: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_windows()

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return True


@dataclass(kw_only=True)
class MistralConfig(DecoderConfig):
    """Mistral: a Llama without biases whose every layer may attend within a sliding window."""

    # Hugging Face's window W: a query sees keys with q - k < W, in every layer. None = no window.
    sliding_window: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _window_from_hf(self.sliding_window, "sliding_window")

    def layer_windows(self) -> tuple[int, ...]:
        return (_window_from_hf(self.sliding_window, "sliding_window"),) * self.num_hidden_layers


# ---- presets: the public config.json of each model (docs/models.md says which) ------------------------

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

QWEN2_PRESETS: dict[str, Qwen2Config] = {
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

QWEN3_PRESETS: dict[str, Qwen3Config] = {
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

MISTRAL_PRESETS: dict[str, MistralConfig] = {
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


def config_fields() -> list[str]:
    """Names of every LlamaConfig field, in declaration order."""
    return [f.name for f in dataclasses.fields(LlamaConfig)]


__all__ = [
    "LAYER_TYPES",
    "LLAMA_PRESETS",
    "MISTRAL_PRESETS",
    "QWEN2_PRESETS",
    "QWEN3_PRESETS",
    "ROPE_FIELDS",
    "ROPE_TYPES",
    "DecoderConfig",
    "LlamaConfig",
    "MistralConfig",
    "Qwen2Config",
    "Qwen3Config",
    "RopeScaling",
    "config_fields",
]
