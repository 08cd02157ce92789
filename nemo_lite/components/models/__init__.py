"""The Llama-style decoder, its configs and presets, and Hugging Face checkpoint import/export.

from nemo_lite.components.models import LlamaForCausalLM, get_preset
model = LlamaForCausalLM(get_preset("tiny"), attention="flex", attn_mask_type="block_causal")
model = LlamaForCausalLM.from_pretrained("~/.cache/nemo_lite/smollm2-135m", attention="sdpa")
"""

from nemo_lite.components.models.config import (
    LlamaConfig,
    RopeScaling,
    UnknownPresetError,
    get_preset,
    list_presets,
)
from nemo_lite.components.models.generate import generate
from nemo_lite.components.models.hf import HF_KEY_MAP, CheckpointError
from nemo_lite.components.models.llama import LlamaForCausalLM, RMSNorm, rope_inv_freq, rotary_cos_sin

__all__ = [
    "HF_KEY_MAP",
    "CheckpointError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RMSNorm",
    "RopeScaling",
    "UnknownPresetError",
    "generate",
    "get_preset",
    "list_presets",
    "rope_inv_freq",
    "rotary_cos_sin",
]
