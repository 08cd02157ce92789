"""What a recipe entry point runs: check the command line, build the trainer, report errors briefly.

Exit codes: 0 finished (or already finished when resumed); 2 a user error (a bad key or value, a missing
or damaged file or checkpoint, a run directory in use or unwritable, a full disk, non-finite training), with
one line on stderr (NEMO_LITE_DEBUG=1 shows the traceback; :func:`user_error_line` lists the families);
130 or 143 stopped by Ctrl-C or SIGTERM after saving a checkpoint (128 + the signal). Anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import sys
import typing
from pathlib import Path
from typing import Any

from nemo_lite.training.config import ConfigError, RecipeConfig

CONFIG_GROUPS = ("model", "attention", "data", "optim", "logger", "peft")


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


def user_error_line(err: BaseException) -> str | None:
    """One line for an error the user can fix (None: a bug, which keeps its traceback).

    The project's own refusals carry their message. A few families from libraries are mapped here: a
    disk that is full or a path that cannot be written (OS errors naming a file), and a damaged
    safetensors file. Anything else, a ValueError or a RuntimeError included, is taken for a bug.
    """
    from safetensors import SafetensorError

    from nemo_lite.errors import NemoLiteError
    from nemo_lite.training.run_dir import disk_full

    own = (
        NemoLiteError,  # every refusal of nemo_lite's own
        FileNotFoundError,  # a data file or directory that is not there (the message names it)
        ImportError,  # an optional package that is not installed (the message says how to get it)
    )
    if isinstance(err, own):
        return str(err)
    if isinstance(err, OSError) and err.filename is not None:
        where = err.filename
        if disk_full(err):
            return f"the disk is full: writing {where} failed; free some space or choose another run_dir"
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot access {where} ({err.strerror}): check its permissions (a run_dir must be writable)"
        if err.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
            return f"{where}: {err.strerror}; choose another run_dir"
    if isinstance(err, OSError) and disk_full(err):
        return "the disk is full; free some space or choose another run_dir"
    if isinstance(err, SafetensorError):
        return f"a safetensors file cannot be read ({err}): replace the damaged file"
    return None


def run_recipe(cfg: Any) -> int:
    """Train with the composed Hydra config. Returns the process exit code."""
    from nemo_lite.training import distributed
    from nemo_lite.training.trainer import Trainer

    info = distributed.init_distributed()
    try:
        result = Trainer(cfg, dist_info=info).fit()
    except Exception as err:
        line = user_error_line(err)
        if line is None or os.environ.get("NEMO_LITE_DEBUG"):
            raise
        if info.rank == 0:
            print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    if result.status == "interrupted":  # the shell's convention: 128 + the signal (130 Ctrl-C, 143 SIGTERM)
        if result.stopped_in != "export":  # the trainer has said what an interrupted export left
            print(f"[nemo_lite] interrupted at step {result.steps}; resume with trainer.resume=true", file=sys.stderr)
        return 128 + int(result.signal)
    return 0


def command_line(argv: list[str]) -> list[str]:
    """``argv`` with every ``model.overrides.KEY=VALUE`` made add-or-override (``++``): a preset's overrides
    dict may or may not hold the key already, and the user should not have to know which."""
    return [f"++{a}" if a.startswith("model.overrides.") and "=" in a else a for a in argv]


# Hydra's flags that take a value (``--cfg job``); the rest of a command line is flags and overrides.
HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp"}
HYDRA_VALUE_FLAGS |= {"--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def overrides_only(argv: list[str]) -> list[str]:
    """The overrides of a command line, without Hydra's flags and their values."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in HYDRA_VALUE_FLAGS
        else:
            out.append(arg)
    return out


def preflight(config_dir: str, config_name: str, overrides: list[str]) -> str | None:
    """Compose the config as Hydra will and check every value before Hydra or the data touch anything:
    composition, the schema's own checks, the data section's, and whether ``run_dir`` can be used (Hydra
    creates it before the recipe runs). Returns the first problem as one line (None: all is well)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    from nemo_lite.errors import NemoLiteError
    from nemo_lite.training.config import register_schema, validate
    from nemo_lite.training.run_dir import check_writable
    from nemo_lite.training.trainer import as_recipe_config

    register_schema()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            composed = compose(config_name=config_name, overrides=overrides)
        recipe = as_recipe_config(composed)  # resolves interpolations and runs the sections' own checks
        validate(recipe)
        check_writable(Path(recipe.run_dir), need_bytes=0)  # Hydra would create it next; the space is checked later
    except NemoLiteError as err:
        return str(err)
    except MissingConfigException as err:
        group, _, choice = (err.missing_cfg_file or "").rpartition("/")
        options = ", ".join(err.options or [])
        return f"{group}={choice} is not one of the {group} configs; choose one of: {options}"
    except OverrideParseException as err:
        return f"cannot parse the command line: {str(err).splitlines()[0]}"
    except (HydraException, OmegaConfBaseException) as err:
        cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException | NemoLiteError) else err
        if isinstance(cause, NemoLiteError):  # a section's check, run by OmegaConf while it builds the object
            return str(cause)
        key = getattr(cause, "full_key", None)
        message = str(getattr(cause, "msg", None) or cause).splitlines()[0]
        given = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(f"{key}=")), None)
        if key and given is not None:
            return f"{key}={given!r} is not valid: {message}"
        return f"{key}: {message}" if key else message
    return None


def main(config_name: str) -> None:
    """Entry point shared by recipes/pretrain.py and recipes/finetune.py."""
    import hydra

    from nemo_lite.training.config import register_schema

    sys.argv[1:] = command_line(sys.argv[1:])
    try:
        check_overrides(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    register_schema()
    config_dir = str(Path(__file__).resolve().parents[2] / "configs")
    if not any(a in ("-m", "--multirun") for a in sys.argv[1:]):  # a sweep composes once per job
        problem = preflight(config_dir, config_name, overrides_only(sys.argv[1:]))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
    exit_code = 0

    @hydra.main(version_base="1.3", config_path=config_dir, config_name=config_name)
    def _run(cfg) -> None:
        nonlocal exit_code
        exit_code = run_recipe(cfg)

    _run()
    sys.exit(exit_code)
