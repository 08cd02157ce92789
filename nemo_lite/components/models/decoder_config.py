"""The shared decoder's config: :class:`DecoderConfig` (the fields every family has, and the properties a
family overrides to say what the decoder builds) and :class:`RopeScaling`.

Field names follow Hugging Face's config classes so that a ``config.json`` maps onto them one to one (the
mapping itself lives in :mod:`nemo_lite.components.models.hf`). The model is ``decoder.py``; a family's
config class derives from :class:`DecoderConfig` in its own ``families/<name>.py``.
"""

from __future__ import annotations

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
    # Padding id of the tokenizer (recorded in config.json; model.pad_embedding_gradient says whether its embedding
    # row gets a gradient from the lookup: by default not for a checkpoint, as in transformers).
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

    @property
    def attention_sinks(self) -> bool:
        """A learned sink logit per query head (``attention.sinks``), for backends that carry sinks."""
        return False

    def layer_windows(self) -> tuple[int, ...]:
        """Each layer's sliding window in nemo_lite's convention (``q - k <= w``; 0 = none)."""
        return (0,) * self.num_hidden_layers


def window_from_hf(sliding_window: int | None, field: str) -> int:
    """nemo_lite's window ``w`` (``q - k <= w``) of a Hugging Face ``sliding_window = W`` (``q - k < W``)."""
    if sliding_window is None:
        return 0
    if not isinstance(sliding_window, int) or sliding_window < 2:
        raise ValueError(
            f"{field}={sliding_window!r} is not supported: it must be an int >= 2 "
            "(a query sees keys with q - k < sliding_window), or None for no window"
        )
    return sliding_window - 1
