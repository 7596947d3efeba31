"""systemd's readiness protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``.

``ailayer up`` says READY=1 once its gate listens, so ``systemctl start ailayer`` returns
when requests can be answered, and STOPPING=1 when it begins to stop. The address is taken
out of the environment at start, so neither the gate nor an engine ever sees it (under
``NotifyAccess=main`` systemd would ignore them anyway). Outside systemd it does nothing.
"""

from __future__ import annotations

import os
import socket

NOTIFY_ENV = "NOTIFY_SOCKET"

_address: str | None = None


def claim() -> None:
    """Take ``$NOTIFY_SOCKET`` out of the environment, keeping it for :func:`notify`."""
    global _address
    raw = os.environ.pop(NOTIFY_ENV, None)
    if raw:
        _address = raw


def notify(*fields: str) -> bool:
    """Send ``KEY=value`` lines; False when not under systemd or the socket refused them."""
    if _address is None:
        return False
    # "@name" is Linux's abstract namespace; a path otherwise. (vsock: addresses are for VMs.)
    address = "\0" + _address[1:] if _address.startswith("@") else _address
    if not address.startswith(("\0", "/")):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True
