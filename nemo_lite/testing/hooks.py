"""Code run inside a training run from outside it, for tests and benchmarks: after each step, after each checkpoint
file (where a test injects a kill or a full disk)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from nemo_lite.training import checkpoint


def after_each_step(trainer: Any, fn: Callable[[Any, dict[str, Any]], Any]) -> None:
    """Call ``fn(trainer, metrics)`` once each step is counted, written and shown, before the loop decides to
    stop or save (where a signal sent by ``fn`` is seen)."""
    inner = trainer._after_step

    def after_step(metrics: dict[str, Any], progress: Any) -> None:
        inner(metrics, progress)
        fn(trainer, metrics)

    trainer._after_step = after_step


@contextlib.contextmanager
def after_each_checkpoint_file(fn: Callable[[str], Any]) -> Iterator[None]:
    """Call ``fn(file_name)`` after each file of a single-process checkpoint is written and synced (before the
    checkpoint's directory is renamed into place): raise from ``fn`` to kill or fill the disk there."""
    fsync = checkpoint._fsync_file

    def fsync_then(path: Any) -> None:
        fsync(path)
        fn(path.name)

    checkpoint._fsync_file = fsync_then
    try:
        yield
    finally:
        checkpoint._fsync_file = fsync
