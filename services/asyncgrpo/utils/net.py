"""Small networking helpers shared by the services."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (for a rendezvous or a server the caller starts next)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
