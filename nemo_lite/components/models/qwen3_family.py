"""The qwen3 family's entry: the shared decoder with an RMSNorm on each head of q and k."""

from __future__ import annotations

from nemo_lite.components.models.config import QWEN3_PRESETS
from nemo_lite.components.models.family import register_model_family
from nemo_lite.components.models.llama import Qwen3ForCausalLM
from nemo_lite.components.models.llama_family import decoder_family

QWEN3 = register_model_family(decoder_family("qwen3", Qwen3ForCausalLM, QWEN3_PRESETS, ("qwen3",)))
