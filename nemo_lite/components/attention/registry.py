"""name -> attention backend class. A backend is one file plus ``@register_attention_backend``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nemo_lite.errors import NemoLiteError
from nemo_lite.registry import Registry

if TYPE_CHECKING:
    from nemo_lite.components.attention.base import AttentionBackend

BACKENDS: Registry[type[AttentionBackend]] = Registry("attention backend", attribute="name")


class UnknownAttentionBackendError(NemoLiteError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def register_attention_backend(name: str):
    """Class decorator: make the backend selectable as ``attention=<name>``."""
    return BACKENDS.register(name)


def unregister_attention_backend(name: str) -> None:
    """Remove a backend (for tests that register temporary ones)."""
    BACKENDS.unregister(name)


def get_attention_backend(name: str) -> type[AttentionBackend]:
    backend_cls = BACKENDS.get(name)
    if backend_cls is None:
        raise UnknownAttentionBackendError(
            f"unknown attention backend {name!r}; registered backends: {', '.join(list_attention_backends())}"
        )
    return backend_cls


def list_attention_backends() -> list[str]:
    return BACKENDS.names()


def build_attention_backend(
    name: str,
    *,
    attn_mask_type: str = "causal",
    fixed_block_size: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> AttentionBackend:
    """The backend ``name`` with its own ``options`` (``attention.options`` of a recipe), checked first.

    An unknown name raises :class:`UnknownAttentionBackendError`; an unknown option or a bad value,
    ``AttentionConfigError`` (one line naming it and the valid ones).
    """
    backend_cls = get_attention_backend(name)
    backend_cls.check_options(options)
    return backend_cls(attn_mask_type=attn_mask_type, fixed_block_size=fixed_block_size, **dict(options or {}))
