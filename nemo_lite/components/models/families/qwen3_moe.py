"""The qwen3_moe family: Qwen3's attention (per-head RMSNorm on q and k) with mixture-of-experts MLPs.

Each MoE layer routes a token to ``num_experts_per_tok`` of ``num_experts`` SwiGLU experts (softmax over the
experts, top-k, renormalized when ``norm_topk_prob``); ``decoder_sparse_step`` and ``mlp_only_layers`` say
which layers have experts, the others the dense MLP of ``intermediate_size``. Published checkpoints store one
tensor per expert (``mlp.experts.{e}.gate_proj.weight``, ...); here they are stacked (``gate_up_proj [E, 2I,
H]``, ``down_proj [E, H, I]``) and split again on export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nemo_lite.components.models.family import HFFacts, register_model_family
from nemo_lite.components.models.moe import MoEConfig, MoEDecoderForCausalLM, moe_family


@dataclass(kw_only=True)
class Qwen3MoeConfig(MoEConfig):
    """Qwen3-MoE: Qwen3's attention, experts in every ``decoder_sparse_step``-th layer not in ``mlp_only_layers``."""

    # Biases on the q/k/v/o projections (False in every released Qwen3-MoE model).
    attention_bias: bool = False
    # Layer i has experts when (i + 1) % decoder_sparse_step == 0 (and i is not in mlp_only_layers).
    decoder_sparse_step: int = 1
    # Layers that keep the dense MLP of intermediate_size.
    mlp_only_layers: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if not isinstance(self.decoder_sparse_step, int) or self.decoder_sparse_step <= 0:
            raise ValueError(f"decoder_sparse_step must be a positive int, got {self.decoder_sparse_step!r}")
        outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            raise ValueError(f"mlp_only_layers {outside} are not layers of 0..{self.num_hidden_layers - 1}")

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return True

    def is_moe_layer(self, index: int) -> bool:
        return index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0


class Qwen3MoeForCausalLM(MoEDecoderForCausalLM):
    """Qwen3-MoE: Qwen3's attention, mixture-of-experts MLPs."""

    config_class = Qwen3MoeConfig


def _qwen3_moe(**fields: Any) -> Qwen3MoeConfig:
    common = dict(
        vocab_size=151936,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
        head_dim=128,
        num_key_value_heads=4,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        router_aux_loss_coef=0.001,
        output_router_logits=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    return Qwen3MoeConfig(**{**common, **fields})


PRESETS: dict[str, Qwen3MoeConfig] = {
    # Qwen/Qwen3-30B-A3B: 30.5B parameters, 3.3B active.
    "qwen3-30b-a3b": _qwen3_moe(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_experts=128,
    ),
    # Qwen/Qwen3-235B-A22B: 235B parameters, 22B active.
    "qwen3-235b-a22b": _qwen3_moe(
        hidden_size=4096,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=94,
        num_attention_heads=64,
        num_experts=128,
    ),
}


def check(config_json: dict[str, Any]) -> None:
    from nemo_lite.components.models.hf import CheckpointError

    if config_json.get("use_sliding_window"):
        raise CheckpointError(
            "qwen3_moe with use_sliding_window=true is not supported (no released Qwen3-MoE model slides); "
            "set it to false"
        )


_EXPERT = "model.layers.{i}.mlp.experts.{e}"

HF = HFFacts(
    model_types=("qwen3_moe",),
    architecture="Qwen3MoeForCausalLM",
    # transformers' Qwen3MoeConfig
    defaults=dict(
        max_position_embeddings=32768,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=False,
        output_router_logits=False,
        router_aux_loss_coef=0.001,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=False,
    ),
    check=check,
    key_map={"layers.{i}.mlp.router.weight": "model.layers.{i}.mlp.gate.weight"},
    expert_keys={
        "layers.{i}.mlp.experts.gate_up_proj": (f"{_EXPERT}.gate_proj.weight", f"{_EXPERT}.up_proj.weight"),
        "layers.{i}.mlp.experts.down_proj": (f"{_EXPERT}.down_proj.weight",),
    },
    aliases={"num_local_experts": "num_experts"},
)

FAMILY = register_model_family(moe_family("qwen3_moe", Qwen3MoeForCausalLM, PRESETS, HF))
