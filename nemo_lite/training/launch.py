"""What a recipe entry point runs: check the command line, build the trainer, report errors briefly.

User errors (a bad key or value, a missing file or checkpoint, non-finite training) end the run with
one line on stderr and exit code 2; set NEMO_LITE_DEBUG=1 to see the traceback. Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from typing import Any

from nemo_lite.training.config import ConfigError, RecipeConfig

CONFIG_GROUPS = ("model", "attention", "data", "optim", "logger")


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_overrides(argv: list[str]) -> None:
    """Refuse a command-line key the schema does not have, listing the valid keys at that level.

    (Hydra would refuse it too, but without naming the valid keys.) Group choices (``attention=X``)
    are left to Hydra, whose message lists the available options.
    """
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra.") or key == "hydra" or key in CONFIG_GROUPS:
            continue
        node: Any = RecipeConfig
        walked = []
        for part in key.split("."):
            if not dataclasses.is_dataclass(node):
                break  # inside a free-form dict (model.overrides.*): anything goes
            fields = _fields(node)
            if part not in fields:
                where = ".".join(walked) or "the top level"
                raise ConfigError(
                    f"unknown config key {key!r}: {where} has no {part!r}; valid keys there: {', '.join(fields)}"
                )
            walked.append(part)
            node = fields[part]
            if isinstance(node, str):  # postponed annotation of a nested section
                node = typing.get_type_hints(RecipeConfig).get(part, node)


def run_recipe(cfg: Any) -> int:
    """Train with the composed Hydra config. Returns the process exit code."""
    from nemo_lite.components.attention import UnknownAttentionBackendError
    from nemo_lite.components.models import CheckpointError, UnknownPresetError
    from nemo_lite.training import distributed
    from nemo_lite.training.checkpoint import CheckpointNotFoundError
    from nemo_lite.training.trainer import NonFiniteLossError, Trainer

    user_errors = (
        ConfigError,
        CheckpointError,
        CheckpointNotFoundError,
        NonFiniteLossError,
        UnknownAttentionBackendError,
        UnknownPresetError,
        FileNotFoundError,
        ValueError,
        ImportError,
    )
    info = distributed.init_distributed()
    try:
        result = Trainer(cfg, dist_info=info).fit()
    except user_errors as err:
        if os.environ.get("NEMO_LITE_DEBUG"):
            raise
        if info.rank == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if result.status == "interrupted":
        print(f"[nemo_lite] interrupted at step {result.steps}; resume with trainer.resume=true", file=sys.stderr)
    return 0


def main(config_name: str) -> None:
    """Entry point shared by recipes/pretrain.py and recipes/finetune.py."""
    from pathlib import Path

    import hydra

    from nemo_lite.training.config import register_schema

    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    register_schema()
    config_dir = str(Path(__file__).resolve().parents[2] / "configs")
    exit_code = 0

    @hydra.main(version_base="1.3", config_path=config_dir, config_name=config_name)
    def _run(cfg) -> None:
        nonlocal exit_code
        exit_code = run_recipe(cfg)

    _run()
    sys.exit(exit_code)
