"""The Llama family's entry: its model, presets, Hugging Face adapter, FSDP2 plan and FLOPs.

Qwen2, Qwen3 and Mistral are the same decoder (``llama.py``) with other configs, so their entries
(``qwen2_family.py``, ...) are built by :func:`decoder_family` with the same plan and FLOPs.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from nemo_lite.components.models.config import LLAMA_PRESETS, DecoderConfig
from nemo_lite.components.models.family import ModelFamily, register_model_family
from nemo_lite.components.models.llama import DecoderForCausalLM, LlamaForCausalLM


def shard(model: DecoderForCausalLM, *, mp_policy=None, reshard_after_forward: bool = True, mesh=None) -> None:
    """FSDP2: one ``fully_shard`` unit per decoder block, then the root (embedding, final norm, head).

    ``reshard_after_forward=False`` keeps each block's gathered parameters from its forward to its
    backward: one all-gather fewer per block and step, for the memory of the unsharded blocks.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    kwargs = {"mp_policy": mp_policy} if mp_policy is not None else {}
    if mesh is not None:  # a 2-D (replicate, shard) mesh makes it HSDP; default: FSDP over every rank
        kwargs["mesh"] = mesh
    for block in model.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root keeps its parameters unsharded after forward (FSDP2's default for the root), so the
    # head loss reads the full output weight after forward_hidden returns.
    fully_shard(model, **kwargs)
    # Training calls forward_hidden (then the head loss), not forward: gather around it too.
    register_fsdp_forward_method(model, "forward_hidden")


def flops_per_token(model: nn.Module) -> int:
    """6 x the parameters that take part in a matmul per token: all but the input embedding lookup (a tied
    output projection is counted once, as the output projection). Norm weights and biases (a few per
    thousand of the total) are counted too."""
    total = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        total -= model.embed_tokens.weight.numel()
    return 6 * total


def attention_flops_per_pair(config: DecoderConfig) -> int:
    """``4 * head_dim`` per allowed (query, key) pair forward (QK^T and PV), x3 with backward, every layer
    and query head."""
    return 3 * 4 * config.head_dim * config.num_attention_heads * config.num_hidden_layers


def decoder_family(
    name: str,
    model_cls: type[DecoderForCausalLM],
    presets: Mapping[str, DecoderConfig],
    hf_model_types: tuple[str, ...],
) -> ModelFamily:
    """The entry of a family of the shared decoder: its own class, config and presets; the decoder's
    blocks, FSDP2 plan and FLOPs."""
    return ModelFamily(
        name=name,
        model_cls=model_cls,
        config_cls=model_cls.config_class,
        presets=presets,
        hf_model_types=hf_model_types,
        load_pretrained=model_cls.from_pretrained,
        blocks=lambda model: list(model.layers),
        # The final norm too: eager, it is ~15 small float32 kernels a step.
        compile_units=lambda model: [*model.layers, model.norm],
        shard=shard,
        flops_per_token=flops_per_token,
        attention_flops_per_pair=attention_flops_per_pair,
    )


LLAMA = register_model_family(decoder_family("llama", LlamaForCausalLM, LLAMA_PRESETS, ("llama",)))
