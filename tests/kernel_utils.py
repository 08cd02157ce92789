"""Running nemo_lite's Triton kernels on CPU, through Triton's interpreter."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch


def interpreted(monkeypatch: pytest.MonkeyPatch, module_name: str) -> ModuleType:
    """``module_name`` imported and decorated again for Triton's interpreter; skips on a GPU machine
    (the compiled kernel is tested there) and where triton is missing."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the compiled kernel is tested instead")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return importlib.reload(importlib.import_module(module_name))
