"""Port holders from the kernel's socket table: what vLLM's early bind needs, on real sockets.

vLLM binds with SO_REUSEADDR before it loads and listens only when ready; a second
SO_REUSEADDR bind succeeds meanwhile, so a bind test calls the port free. TIME_WAIT left by
closed connections must not make it busy.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from reconciler.kit.freeport import free_port
from reconciler.observe import gather, ports

pytestmark = pytest.mark.integration


@pytest.fixture
def sock_diag() -> None:
    if ports.observer() != "sock_diag":
        if os.environ.get("CI") == "true":
            pytest.fail("CI's kernel reports bound-only sockets over sock_diag (Linux 6.8+)")
        pytest.skip("this kernel does not report bound-only sockets (needs Linux 6.8+)")


@pytest.fixture
def bound() -> Iterator[socket.socket]:
    """A socket bound the way vLLM binds before loading: SO_REUSEADDR, not listening."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_bound_but_not_listening_is_busy_and_its_holder_is_found(sock_diag: None,
                                                                  bound: socket.socket) -> None:
    port = bound.getsockname()[1]
    assert ports._bindable("127.0.0.1", port), "the old bind test would call it free"
    assert not ports.is_free("127.0.0.1", port)
    assert gather.port_holders(port, likely=[]) == {os.getpid(): False}
    assert gather.port_holders(port, likely=[os.getpid()]) == {os.getpid(): False}


def test_listening_is_busy_and_marked_as_listening(sock_diag: None, bound: socket.socket) -> None:
    port = bound.getsockname()[1]
    bound.listen()
    assert not ports.is_free("127.0.0.1", port)
    assert gather.port_holders(port, likely=[os.getpid()]) == {os.getpid(): True}


def test_time_wait_alone_leaves_the_port_free(sock_diag: None) -> None:
    port = free_port()
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        conn.close()  # the server side closes first: its end goes to TIME_WAIT
        client.close()
    assert _time_wait_on(port), "the scenario needs a TIME_WAIT entry"
    assert ports.is_free("127.0.0.1", port)
    assert gather.port_holders(port, likely=[]) == {}


def test_a_free_port_is_free() -> None:
    assert ports.is_free("127.0.0.1", free_port())


def _time_wait_on(port: int) -> bool:
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return any(int(row[1].split(":")[1], 16) == port and row[3] == "06" for row in rows)
