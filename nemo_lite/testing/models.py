"""Test helpers for model families (the package itself goes from a config or a checkpoint to a family)."""

from __future__ import annotations

from torch import nn

from nemo_lite.components.models import ModelFamily, model_families


def family_of_model(model: nn.Module) -> ModelFamily:
    """The family whose model class ``model`` is (or, failing that, derives from most closely)."""
    families = model_families()
    for cls in type(model).__mro__:
        for family in families:
            if family.model_cls is cls:
                return family
    raise TypeError(f"{type(model).__qualname__} belongs to no registered model family")
