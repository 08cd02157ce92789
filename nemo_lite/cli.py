"""The command line of the inference recipes (``recipes/generate.py``, ``recipes/evaluate.py``): ``key=value``
arguments onto a config dataclass, as the training recipes take them (``tasks=[a,b]`` is a list)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from nemo_lite.errors import ConfigError, NemoLiteError

C = TypeVar("C")


def parse_args(schema: type[C], argv: Sequence[str]) -> C:
    """``argv`` (``key=value`` items) onto ``schema``'s defaults; an unknown key or a bad value is a
    :class:`ConfigError` naming it and the valid keys."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    keys = [f.name for f in dataclasses.fields(schema)]
    for item in argv:
        key = item.split("=", 1)[0]
        if "=" not in item:
            raise ConfigError(f"argument {item!r} is not key=value; keys: {', '.join(keys)}")
        if key not in keys:
            raise ConfigError(f"unknown key {key!r}; keys: {', '.join(keys)}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist(list(argv)))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"{missing[0]} is required: pass {missing[0]}=...")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def run_cli(schema: type[C], main: Callable[[C], Any], argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run ``main``; a user error prints one line and exits with 2."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(schema.__doc__)
        for field in dataclasses.fields(schema):
            print(f"  {field.name}={field.default if field.default is not dataclasses.MISSING else '...'}")
        return
    try:
        main(parse_args(schema, argv))
    except NemoLiteError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
