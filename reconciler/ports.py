"""Is a TCP port free? Answered the way the engine will find out: by binding it."""

from __future__ import annotations

import socket


def is_free(host: str, port: int) -> bool:
    """True if a server could bind ``host:port`` now (SO_REUSEADDR, like uvicorn and Go do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
