"""Who holds a TCP port: the kernel's own socket table, read through sock_diag netlink.

A bind test is not enough. vLLM binds its port with SO_REUSEADDR before it loads and
listens only once ready, and a second SO_REUSEADDR bind of a bound-but-not-listening port
succeeds, so "can I bind it?" says free while a loading vLLM holds it. Linux 6.8+ dumps such
sockets (TCP_BOUND_INACTIVE) over sock_diag; TIME_WAIT entries are left out, so a port that
only has closing connections on it is free, as it is for any server that sets SO_REUSEADDR.
On kernels without sock_diag the old bind test is the fallback (it cannot see a
bound-but-not-listening holder; ``observer()`` says which one is in use).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from functools import cache

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
TCP_BOUND_INACTIVE = 13  # the dump flag; such sockets are reported in state TCP_CLOSE (7)
_HEADER = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBBBI48x")
_MSG_HEAD = struct.Struct("=BBBB")
_PORT = struct.Struct("!H")
_UID_INODE = struct.Struct("=II")
_UID_OFFSET = 4 + 48 + 12  # family/state/timer/retrans, the socket id, expires/rqueue/wqueue


@dataclass(frozen=True)
class Socket:
    """One socket holding a local TCP port: its inode finds the process through /proc/PID/fd."""

    port: int
    listening: bool  # False: bound, not (yet) listening
    inode: int
    uid: int


def _dump(family: int, states: int) -> list[Socket]:
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, states)
        nl.sendto(_HEADER.pack(_HEADER.size + len(request), SOCK_DIAG_BY_FAMILY,
                               NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request, (0, 0))
        found: list[Socket] = []
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
                body = offset + _HEADER.size
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, body)[0]
                    raise OSError(code, "sock_diag dump refused")
                _, state, _, _ = _MSG_HEAD.unpack_from(data, body)
                (port,) = _PORT.unpack_from(data, body + 4)
                uid, inode = _UID_INODE.unpack_from(data, body + _UID_OFFSET)
                found.append(Socket(port, state == TCP_LISTEN, inode, uid))
                offset += (length + 3) & ~3
            if not data:
                return found


def _table(bound: bool = True) -> list[Socket]:
    states = (1 << TCP_LISTEN) | ((1 << TCP_BOUND_INACTIVE) if bound else 0)
    return _dump(socket.AF_INET, states) + _dump(socket.AF_INET6, states)


def table(bound: bool = True) -> list[Socket] | None:
    """One read of the socket table for a pass to share (None: use the bind test).

    Bound-but-not-listening sockets cost the kernel a walk of its whole bind hash (~3 ms
    per address family, against 0.02 ms for listeners only): ``bound=False`` when only
    listeners matter (our engine listens already).
    """
    if observer() != "sock_diag":
        return None
    try:
        return _table(bound)
    except OSError:
        return None


@cache
def observer() -> str:
    """'sock_diag' where the kernel reports bound-but-not-listening sockets, else 'bind-test'."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
            seen = any(s.port == port and not s.listening for s in _dump(socket.AF_INET, 1 << TCP_BOUND_INACTIVE))
    except OSError:
        return "bind-test"
    return "sock_diag" if seen else "bind-test"


def holders(port: int, sockets: list[Socket] | None = None) -> list[Socket]:
    """Sockets bound to ``port``, listening or not (empty under the bind-test fallback);
    from ``sockets`` (a ``table()``) when given."""
    found = sockets if sockets is not None else table()
    return [s for s in found or () if s.port == port]


def _bindable(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def is_free(host: str, port: int, sockets: list[Socket] | None = None) -> bool:
    """True if the engine could bind and listen on ``host:port`` now; ``sockets`` is a full
    ``table()`` (bound sockets included) already read in this pass."""
    found = sockets if sockets is not None else table()
    return not any(s.port == port for s in found or ()) and _bindable(host, port)
