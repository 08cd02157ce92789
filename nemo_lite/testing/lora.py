"""Reading what a LoRA run exported, for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nemo_lite.training.converters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def read_adapter_dir(path: str | Path) -> tuple[dict[str, Any], list[str]]:
    """(adapter_config.json, tensor names) of an adapter directory."""
    from safetensors import safe_open

    path = Path(path)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as f:
        return config, sorted(f.keys())
