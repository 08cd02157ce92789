"""One module per model family; importing this package imports (and so registers) every one of them.

A family is one file here: its config class and presets, its model class, its Hugging Face facts
(:class:`~nemo_lite.components.models.family.HFFacts`) and the :func:`register_model_family` call.
Nothing else names it: this package finds the modules by listing its own directory.
"""

from __future__ import annotations

import importlib
import pkgutil


def _import_all() -> list[str]:
    # A family may build on another (and import it): sorted order only makes the registration order stable.
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


FAMILY_MODULES = _import_all()
