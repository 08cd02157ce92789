"""The gpt_oss family: OpenAI's gpt-oss, a mixture of experts with attention sinks.

Every layer routes a token to ``num_experts_per_tok`` of ``num_local_experts`` experts (top-k of the router's
logits, then a softmax over those k; the router has a bias). The experts are the clamped SwiGLU
``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = clamp(gate, max=limit)``, with biases, their
weights stored input-major with gate and up interleaved (``gate_up_proj [E, H, 2I]``), as the checkpoints store
them. Attention has biases on q/k/v/o, a learned sink logit per query head (``attention.sinks``: carried by
the flex, sdpa and eager backends; varlen is refused in one line), and alternates ``layer_types``: sliding
windows of ``sliding_window`` tokens and full attention. The rotary embedding is YaRN.

The published checkpoints store the expert weights as MXFP4 (``gate_up_proj_blocks`` + ``_scales``): loading
dequantizes them (``hf.dequantize_mxfp4``) into the model's dtype; the export writes them unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_lite.components.models.decoder import RopeScaling, window_from_hf
from nemo_lite.components.models.family import HFFacts, register_model_family
from nemo_lite.components.models.moe import MoEConfig, MoEDecoderForCausalLM, moe_family

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(kw_only=True)
class GptOssConfig(MoEConfig):
    """gpt-oss: MoE in every layer (experts of ``intermediate_size``), sinks, alternating sliding windows."""

    # Biases on the q/k/v/o projections (true in the released models).
    attention_bias: bool = True
    # Hugging Face's window W of the sliding layers: a query sees keys with q - k < W.
    sliding_window: int | None = 128
    # Per layer "sliding_attention" or "full_attention"; None = alternating, sliding first (as transformers).
    layer_types: list[str] | None = None
    # The clamped SwiGLU's sigmoid slope and clamp.
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # Derived, not set: gpt-oss's experts are intermediate_size wide (it has no dense MLP); set intermediate_size.
    moe_intermediate_size: int = 0

    def __post_init__(self) -> None:
        self.moe_intermediate_size = self.intermediate_size
        super().__post_init__()
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ValueError(f"layer_types {unknown} are not supported; supported: {', '.join(LAYER_TYPES)}")
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for num_hidden_layers={self.num_hidden_layers}"
                )
        window_from_hf(self.sliding_window, "sliding_window")

    def kinds(self) -> list[str]:
        """Each layer's attention kind: ``layer_types``, or alternating from a sliding layer 0 (transformers')."""
        if self.layer_types is not None:
            return self.layer_types
        return [LAYER_TYPES[(i + 1) % 2] for i in range(self.num_hidden_layers)]

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def attention_sinks(self) -> bool:
        return True

    @property
    def softmax_after_topk(self) -> bool:
        return True

    @property
    def router_bias(self) -> bool:
        return True

    def experts_layout(self) -> dict:
        return dict(
            transposed=True,
            interleaved=True,
            bias=True,
            swiglu_alpha=self.swiglu_alpha,
            swiglu_limit=self.swiglu_limit,
        )

    def layer_windows(self) -> tuple[int, ...]:
        window = window_from_hf(self.sliding_window, "sliding_window")
        return tuple(window if kind == "sliding_attention" else 0 for kind in self.kinds())


class GptOssForCausalLM(MoEDecoderForCausalLM):
    """gpt-oss: attention with sinks and alternating sliding windows, clamped-SwiGLU experts with biases."""

    config_class = GptOssConfig


def _gpt_oss(**fields: Any) -> GptOssConfig:
    common = dict(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_experts_per_tok=4,
        sliding_window=128,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=150000.0,
        rope_scaling=RopeScaling(
            rope_type="yarn",
            factor=32.0,
            beta_fast=32.0,
            beta_slow=1.0,
            original_max_position_embeddings=4096,
            truncate=False,
        ),
        tie_word_embeddings=False,
        router_aux_loss_coef=0.9,
        output_router_logits=False,
        eos_token_id=200002,
        pad_token_id=199999,
    )
    return GptOssConfig(**{**common, **fields})


PRESETS: dict[str, GptOssConfig] = {
    # openai/gpt-oss-20b: 21B parameters, 3.6B active.
    "gpt-oss-20b": _gpt_oss(num_hidden_layers=24, num_experts=32),
    # openai/gpt-oss-120b: 117B parameters, 5.1B active.
    "gpt-oss-120b": _gpt_oss(num_hidden_layers=36, num_experts=128),
}

HF = HFFacts(
    model_types=("gpt_oss",),
    architecture="GptOssForCausalLM",
    # transformers' GptOssConfig
    defaults=dict(
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        num_experts=128,
        num_experts_per_tok=4,
        sliding_window=128,
        swiglu_alpha=1.702,
        swiglu_limit=7.0,
        router_aux_loss_coef=0.001,
        output_router_logits=False,
        attention_bias=True,
        head_dim=64,
    ),
    aliases={"num_local_experts": "num_experts"},
)

FAMILY = register_model_family(moe_family("gpt_oss", GptOssForCausalLM, PRESETS, HF))
