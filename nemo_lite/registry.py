"""One name -> class table, the shape of every plug-in point: attention backends, record kinds,
optimizers, converters. Each keeps its own lookup error (the config key it reads and the valid names);
this class holds what they share: registering by a class decorator, refusing a second class under a
taken name, and the sorted names.

    BACKENDS = Registry("attention backend", attribute="name")

    @BACKENDS.register("sdpa")
    class SDPABackend(AttentionBackend): ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by name, in registration order. ``attribute``: the class attribute set to its name."""

    def __init__(self, what: str, *, attribute: str) -> None:
        self.what, self.attribute = what, attribute
        self._classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: ``cls`` is found under ``name`` (and ``cls.<attribute> == name``)."""

        def decorator(cls: T) -> T:
            existing = self._classes.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(f"{self.what} {name!r} is already registered by {existing.__qualname__}")
            setattr(cls, self.attribute, name)
            self._classes[name] = cls
            return cls

        return decorator

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register temporary classes)."""
        self._classes.pop(name, None)

    def get(self, name: str) -> T | None:
        return self._classes.get(name)

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._classes.values()))
