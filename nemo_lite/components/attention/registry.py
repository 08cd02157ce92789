"""name -> attention backend class. A backend is one file plus ``@register_attention_backend``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from nemo_lite.errors import NemoLiteError

if TYPE_CHECKING:
    from nemo_lite.components.attention.base import AttentionBackend

_BACKENDS: dict[str, type[AttentionBackend]] = {}

B = TypeVar("B", bound="type[AttentionBackend]")


class UnknownAttentionBackendError(NemoLiteError, KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def register_attention_backend(name: str) -> Callable[[B], B]:
    """Class decorator: make the backend selectable as ``attention=<name>``."""

    def decorator(cls: B) -> B:
        existing = _BACKENDS.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"attention backend {name!r} is already registered by {existing.__qualname__}")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return decorator


def unregister_attention_backend(name: str) -> None:
    """Remove a backend (for tests that register temporary ones)."""
    _BACKENDS.pop(name, None)


def get_attention_backend(name: str) -> type[AttentionBackend]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise UnknownAttentionBackendError(
            f"unknown attention backend {name!r}; registered backends: {', '.join(list_attention_backends())}"
        ) from None


def list_attention_backends() -> list[str]:
    return sorted(_BACKENDS)


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
