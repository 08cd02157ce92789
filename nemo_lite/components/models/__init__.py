"""Model families (Llama first), their configs and presets, and Hugging Face checkpoint import/export.

from nemo_lite.components.models import LlamaForCausalLM, get_preset
model = LlamaForCausalLM(get_preset("tiny"), attention="flex", attn_mask_type="block_causal")
model = LlamaForCausalLM.from_pretrained("~/.cache/nemo_lite/smollm2-135m", attention="sdpa")

What training needs of a family is its entry, :class:`ModelFamily` (``get_model_family("llama")``).
"""

from nemo_lite.components.models.config import LlamaConfig, RopeScaling
from nemo_lite.components.models.family import (
    CausalLM,
    CheckpointNotFoundError,
    ModelFamily,
    UnknownModelTypeError,
    UnknownPresetError,
    family_of_checkpoint,
    family_of_model,
    family_of_preset,
    get_model_family,
    get_preset,
    list_presets,
    register_model_family,
    resolve_pretrained,
)
from nemo_lite.components.models.generate import generate
from nemo_lite.components.models.hf import HF_KEY_MAP, CheckpointError
from nemo_lite.components.models.llama import LlamaForCausalLM, RMSNorm, rope_inv_freq, rotary_cos_sin
from nemo_lite.components.models.llama_family import LLAMA  # registers the family

__all__ = [
    "HF_KEY_MAP",
    "LLAMA",
    "CausalLM",
    "CheckpointNotFoundError",
    "CheckpointError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelFamily",
    "RMSNorm",
    "RopeScaling",
    "UnknownModelTypeError",
    "UnknownPresetError",
    "family_of_checkpoint",
    "family_of_model",
    "family_of_preset",
    "generate",
    "get_model_family",
    "get_preset",
    "list_presets",
    "register_model_family",
    "resolve_pretrained",
    "rope_inv_freq",
    "rotary_cos_sin",
]
