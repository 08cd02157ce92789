"""Model families (Llama, Qwen2, Qwen3, Mistral), their configs and presets, and Hugging Face checkpoint
import/export.

from nemo_lite.components.models import AutoModelForCausalLM, LlamaForCausalLM, get_preset
model = LlamaForCausalLM(get_preset("tiny"), attention="flex", attn_mask_type="block_causal")
model = AutoModelForCausalLM.from_pretrained("~/.cache/nemo_lite/smollm2-135m", attention="sdpa")
model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")    # a hub id, through the HF cache

What training needs of a family is its entry, :class:`ModelFamily` (``get_model_family("llama")``).
"""

from nemo_lite.components.models.config import (
    DecoderConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    RopeScaling,
)
from nemo_lite.components.models.family import (
    AutoModelForCausalLM,
    CausalLM,
    ModelFamily,
    PretrainedNotFoundError,
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
from nemo_lite.components.models.llama import (
    DecoderForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
    RMSNorm,
    rope_inv_freq,
    rotary_cos_sin,
)
from nemo_lite.components.models.llama_family import LLAMA  # registers the family (each import below: one)
from nemo_lite.components.models.mistral_family import MISTRAL
from nemo_lite.components.models.qwen2_family import QWEN2
from nemo_lite.components.models.qwen3_family import QWEN3

__all__ = [
    "HF_KEY_MAP",
    "LLAMA",
    "MISTRAL",
    "QWEN2",
    "QWEN3",
    "AutoModelForCausalLM",
    "CausalLM",
    "CheckpointError",
    "PretrainedNotFoundError",
    "DecoderConfig",
    "DecoderForCausalLM",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MistralConfig",
    "MistralForCausalLM",
    "ModelFamily",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "Qwen3Config",
    "Qwen3ForCausalLM",
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
