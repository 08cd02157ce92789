"""Model families on one shared decoder, their configs and presets, and Hugging Face checkpoint
import/export.

    from nemo_lite.components.attention import AttentionConfig
    from nemo_lite.components.models import AutoModelForCausalLM, LlamaForCausalLM, get_model_family, get_preset

    attention = AttentionConfig(backend="flex", attn_mask_type="block_causal")
    model = LlamaForCausalLM(get_preset("tiny"), attention=attention)
    model = AutoModelForCausalLM.from_pretrained("~/.cache/nemo_lite/smollm2-135m")    # any registered family
    family = get_model_family(name)          # a family's entry: model_cls, config_cls, presets, hf, ...

The shared decoder is :mod:`~nemo_lite.components.models.decoder`; each family is one module of
:mod:`~nemo_lite.components.models.families` (its config and model classes are imported from there).
What training needs of a family is its entry, :class:`ModelFamily`.
"""

from nemo_lite.components.models import families  # noqa: F401  (imports, and so registers, every family)
from nemo_lite.components.models.decoder import (
    DecoderConfig,
    DecoderForCausalLM,
    RMSNorm,
    RopeScaling,
    rope_inv_freq,
    rotary_cos_sin,
)
from nemo_lite.components.models.families.llama import LlamaConfig, LlamaForCausalLM
from nemo_lite.components.models.family import (
    AutoModelForCausalLM,
    CausalLM,
    HFFacts,
    ModelFamily,
    PretrainedNotFoundError,
    UnknownModelTypeError,
    UnknownPresetError,
    family_of_checkpoint,
    family_of_config,
    family_of_preset,
    get_model_family,
    get_preset,
    list_presets,
    model_families,
    register_model_family,
    resolve_pretrained,
    unregister_model_family,
)
from nemo_lite.components.models.generate import generate
from nemo_lite.components.models.hf import HF_KEY_MAP, CheckpointError

__all__ = [
    "HF_KEY_MAP",
    "AutoModelForCausalLM",
    "CausalLM",
    "CheckpointError",
    "DecoderConfig",
    "DecoderForCausalLM",
    "HFFacts",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelFamily",
    "PretrainedNotFoundError",
    "RMSNorm",
    "RopeScaling",
    "UnknownModelTypeError",
    "UnknownPresetError",
    "family_of_checkpoint",
    "family_of_config",
    "family_of_preset",
    "generate",
    "get_model_family",
    "get_preset",
    "list_presets",
    "model_families",
    "register_model_family",
    "resolve_pretrained",
    "rope_inv_freq",
    "rotary_cos_sin",
    "unregister_model_family",
]
