"""Ports for the processes a test launches: never a fixed number, since test files may run side by side."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
