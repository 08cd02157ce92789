"""The mixtral family: Mistral's attention (an optional sliding window on every layer) with a mixture of
experts in every layer: softmax over the experts, top-k, renormalized; SwiGLU experts of ``intermediate_size``.

Checkpoints store one tensor per expert under Mixtral's own names (``block_sparse_moe.experts.{e}.w1``, ``w3``,
``w2``: gate, up, down; the router ``block_sparse_moe.gate``); here they are stacked (``gate_up_proj``,
``down_proj``) and split again on export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nemo_lite.components.models.decoder import window_from_hf
from nemo_lite.components.models.family import HFFacts, register_model_family
from nemo_lite.components.models.moe import MoEConfig, MoEDecoderForCausalLM, moe_family


@dataclass(kw_only=True)
class MixtralConfig(MoEConfig):
    """Mixtral: every layer a mixture of experts of width intermediate_size; the top-k weights renormalized."""

    # Hugging Face's window W on every layer (q - k < W); None = none (Mixtral-8x7B).
    sliding_window: int | None = None
    # Derived, not set: Mixtral's experts are intermediate_size wide (it has no dense MLP); set intermediate_size.
    moe_intermediate_size: int = 0
    # Always true in Mixtral (transformers renormalizes the top-k weights unconditionally).
    norm_topk_prob: bool = True

    def __post_init__(self) -> None:
        self.moe_intermediate_size = self.intermediate_size
        self.norm_topk_prob = True
        super().__post_init__()
        window_from_hf(self.sliding_window, "sliding_window")

    def layer_windows(self) -> tuple[int, ...]:
        return (window_from_hf(self.sliding_window, "sliding_window"),) * self.num_hidden_layers


class MixtralForCausalLM(MoEDecoderForCausalLM):
    """Mixtral: Mistral's attention, a mixture of SwiGLU experts in every layer."""

    config_class = MixtralConfig


PRESETS: dict[str, MixtralConfig] = {
    # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters, 12.9B active.
    "mixtral-8x7b": MixtralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        sliding_window=None,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.02,
        output_router_logits=False,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def check(config_json: dict[str, Any]) -> None:
    from nemo_lite.components.models.hf import CheckpointError

    if config_json.get("router_jitter_noise"):
        raise CheckpointError(
            f"router_jitter_noise={config_json['router_jitter_noise']!r} is not supported (nemo_lite's router adds "
            "no noise): set it to 0.0 in config.json"
        )


_EXPERT = "model.layers.{i}.block_sparse_moe.experts.{e}"

HF = HFFacts(
    model_types=("mixtral",),
    architecture="MixtralForCausalLM",
    # transformers' MixtralConfig
    defaults=dict(
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-5,
        num_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
        router_aux_loss_coef=0.001,
        output_router_logits=False,
    ),
    check=check,
    key_map={"layers.{i}.mlp.router.weight": "model.layers.{i}.block_sparse_moe.gate.weight"},
    expert_keys={
        "layers.{i}.mlp.experts.gate_up_proj": (f"{_EXPERT}.w1.weight", f"{_EXPERT}.w3.weight"),
        "layers.{i}.mlp.experts.down_proj": (f"{_EXPERT}.w2.weight",),
    },
    aliases={"num_local_experts": "num_experts"},
)

FAMILY = register_model_family(moe_family("mixtral", MixtralForCausalLM, PRESETS, HF))
