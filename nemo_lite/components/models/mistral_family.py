"""The mistral family's entry: the shared decoder, every layer within ``config.sliding_window``."""

from __future__ import annotations

from nemo_lite.components.models.config import MISTRAL_PRESETS
from nemo_lite.components.models.family import register_model_family
from nemo_lite.components.models.llama import MistralForCausalLM
from nemo_lite.components.models.llama_family import decoder_family

MISTRAL = register_model_family(decoder_family("mistral", MistralForCausalLM, MISTRAL_PRESETS, ("mistral",)))
