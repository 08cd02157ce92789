"""The qwen2 family's entry (Qwen2 and Qwen2.5): the shared decoder with biases on q, k and v."""

from __future__ import annotations

from nemo_lite.components.models.config import QWEN2_PRESETS
from nemo_lite.components.models.family import register_model_family
from nemo_lite.components.models.llama import Qwen2ForCausalLM
from nemo_lite.components.models.llama_family import decoder_family

QWEN2 = register_model_family(decoder_family("qwen2", Qwen2ForCausalLM, QWEN2_PRESETS, ("qwen2",)))
