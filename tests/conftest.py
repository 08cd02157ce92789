"""Shared test set-up: CPU by default, GPU tests behind one marker, global state reset per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (attention_reference, ...)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _reset_global_state():
    """Seeds and the flex backend's class-level step masks must not leak from one test to the next."""
    from nemo_lite.components.attention.flex_attention import FlexAttention

    torch.manual_seed(0)
    saved_types = set(FlexAttention.used_attn_mask_types)
    yield
    FlexAttention.used_attn_mask_types = saved_types
    FlexAttention.block_masks = {}
    FlexAttention._step_masks = {}
