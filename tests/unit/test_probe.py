"""reconciler.observe.probe and the warm-up (reconciler.act.warmup) against tiny real HTTP
servers on loopback (threads, real sockets).

The case that matters most: Ollama from 0.32.4 holds ``/api/ps`` until a load ends, so a
JSON check that times out must read as "still loading", never as a failed probe.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from reconciler.act import warmup
from reconciler.domain.catalog import Engine, JsonCheck, ReadyProbe, Warmup
from reconciler.domain.facts import WarmupPhase, WarmupState
from reconciler.kit.freeport import free_port
from reconciler.observe import probe

SERVED = "gemma2:9b"
# The probe's own timeout in these tests: short, so a blocked request ends quickly.
PROBE_TIMEOUT_S = 0.3
# How long a "blocking" route holds a request at most; far beyond the probe's timeout,
# and released at teardown so the server thread never outlives the test.
HOLD_S = 10.0
# How often the server thread looks for shutdown (the default 0.5 s adds up over the tests).
SHUTDOWN_POLL_S = 0.02


@dataclass
class Route:
    status: int = 200
    body: object = field(default_factory=dict)
    hold: bool = False  # answer only when the test releases it (or after HOLD_S)


@dataclass
class FakeEngine:
    """An HTTP server whose routes a test sets; it records the requests it gets."""

    server: ThreadingHTTPServer
    routes: dict[str, Route]
    release: threading.Event
    seen: list[tuple[str, str, bytes]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


def _handler(fake: Callable[[], FakeEngine]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            engine = fake()
            length = int(self.headers.get("Content-Length") or 0)
            engine.seen.append((self.command, self.path, self.rfile.read(length)))
            route = engine.routes.get(self.path, Route(404, {"error": "no route"}))
            if route.hold:
                engine.release.wait(HOLD_S)
            payload = json.dumps(route.body).encode()
            self.send_response(route.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _answer
        do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: pytest shows failures, not every request."""

    return Handler


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    holder: list[FakeEngine] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(lambda: holder[0]))
    server.daemon_threads = True
    engine = FakeEngine(server, {}, threading.Event())
    holder.append(engine)
    thread = threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL_S,), name="fake-engine", daemon=True)
    thread.start()
    try:
        yield engine
    finally:
        engine.release.set()
        server.shutdown()
        server.server_close()
        thread.join(HOLD_S)


def ollama_engine(port: int) -> Engine:
    ready = ReadyProbe(
        url="/api/version",
        timeout_s=PROBE_TIMEOUT_S,
        warmup=Warmup("/api/generate", "POST", {"model": SERVED, "keep_alive": -1}),
        json_check=JsonCheck("/api/ps", "models.*.name", SERVED),
    )
    return Engine(
        name="gemma2",
        kind="ollama",
        command=("ollama", "serve"),
        env={},
        port=port,
        host="127.0.0.1",
        served_name=SERVED,
        boot_timeout_s=60.0,
        ready=ready,
    )


def listed(*names: str) -> dict[str, object]:
    return {"models": [{"name": n} for n in names]}


def test_ready_when_the_json_check_lists_the_model(fake: FakeEngine) -> None:
    fake.routes.update({"/api/version": Route(body={"version": "0.32.4"}), "/api/ps": Route(body=listed(SERVED))})
    result = probe.check(ollama_engine(fake.port))
    assert (result.ok, result.json_ok) == (True, True)
    assert result.detail == "HTTP 200"


def test_a_blocking_json_check_is_still_loading_not_a_failure(fake: FakeEngine) -> None:
    fake.routes.update({"/api/version": Route(body={"version": "0.32.4"}), "/api/ps": Route(hold=True)})
    result = probe.check(ollama_engine(fake.port))
    assert (result.ok, result.json_ok) == (True, False)
    assert result.detail.startswith("HTTP 200; still loading: /api/ps did not answer within 0.3 s"), result.detail


def test_a_model_not_listed_yet(fake: FakeEngine) -> None:
    fake.routes.update({"/api/version": Route(), "/api/ps": Route(body=listed("other:latest"))})
    result = probe.check(ollama_engine(fake.port))
    assert (result.ok, result.json_ok) == (True, False)
    assert f"{SERVED!r} not yet at models.*.name of /api/ps" in result.detail


def test_a_json_check_answering_garbage_is_not_ok(fake: FakeEngine) -> None:
    fake.routes.update({"/api/version": Route(), "/api/ps": Route(500, "not an object")})
    result = probe.check(ollama_engine(fake.port))
    assert (result.ok, result.json_ok) == (True, False)


def test_a_readiness_url_that_times_out_fails_the_probe(fake: FakeEngine) -> None:
    fake.routes["/api/version"] = Route(hold=True)
    result = probe.check(ollama_engine(fake.port))
    assert (result.ok, result.detail) == (False, "probe timed out")


def test_a_wrong_status_fails_the_probe(fake: FakeEngine) -> None:
    fake.routes["/api/version"] = Route(503, {"error": "Loading model"})
    result = probe.check(ollama_engine(fake.port))
    assert not result.ok and result.detail.startswith("HTTP 503"), result.detail


def test_nothing_listening_fails_the_probe() -> None:
    result = probe.check(ollama_engine(free_port()))
    assert (result.ok, result.detail) == (False, "connection refused (not listening yet)")


def test_warmup_sends_its_body_and_reports_done(fake: FakeEngine) -> None:
    fake.routes["/api/generate"] = Route(body={"done": True, "done_reason": "load"})
    assert warmup.send(ollama_engine(fake.port), timeout_s=5.0) == WarmupState(WarmupPhase.DONE)
    method, path, body = fake.seen[-1]
    assert (method, path, json.loads(body)) == ("POST", "/api/generate", {"model": SERVED, "keep_alive": -1})


def test_warmup_reports_an_engine_error(fake: FakeEngine) -> None:
    fake.routes["/api/generate"] = Route(500, {"error": "llama runner process has terminated: exit status 1"})
    result = warmup.send(ollama_engine(fake.port), timeout_s=5.0)
    assert result.phase is WarmupPhase.FAILED and "exit status 1" in result.why
    assert str(result).startswith("failed: HTTP 500")  # as the loading message shows it


HOSTILE = {
    "bad status line": b"NOT-HTTP garbage\r\n\r\n",
    "incomplete body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
    "line too long": b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("reply", list(HOSTILE.values()), ids=list(HOSTILE))
def test_a_hostile_reply_is_a_failed_probe_never_an_exception(reply: bytes) -> None:
    """A malformed answer must not escape: it failed every pass and the warm-up thread."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer() -> None:
            for _ in range(2):  # the readiness probe, then the warm-up
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        engine = Engine(name="m", kind="generic", command=("x",), env={}, port=port, host="127.0.0.1",
                        served_name="m", boot_timeout_s=60,
                        ready=ReadyProbe(url="/health", timeout_s=PROBE_TIMEOUT_S,
                                         warmup=Warmup(url="/api/generate")))
        result = probe.check(engine)
        assert not result.ok and result.detail
        sent = warmup.send(engine, PROBE_TIMEOUT_S)
        assert sent.phase is WarmupPhase.FAILED and str(sent).startswith("failed: ")
        thread.join(HOLD_S)
