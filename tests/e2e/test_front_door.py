"""The gate's front door (reconciler/gate/frontdoor.py) on real sockets: plain requests answered
by it, everything else handed to aiohttp on the same connection, in order, nothing lost.

Raw sockets, because what is tested is the connection itself: several requests on one
keep-alive connection, pipelined requests, and bytes no HTTP library would send.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from typing import Any, BinaryIO

import httpx
import pytest

from reconciler.gate.budget import BODY_BUDGET_BYTES
from reconciler.gate.frontdoor import FAST_BODY_MAX, MAX_HEAD_BYTES
from tests.e2e.standalone_gate import (
    CONDITION_DEADLINE_S,
    OLLAMA_SERVED,
    TOKEN,
    VLLM_SERVED,
    DemoEngine,
    Gate,
    Processes,
    chat_body,
    metric,
    sse_events,
    start_gate,
)
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


class _Unclosed:
    """The connection's one buffered file, which each HTTPResponse may "close" when done."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)

    def close(self) -> None:
        pass


class _Conn:
    """One raw keep-alive connection; responses are read in order from one buffered file."""

    def __init__(self, gate: Gate) -> None:
        host, port = gate.url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=CONDITION_DEADLINE_S)
        self.file: BinaryIO = self.sock.makefile("rb")

    def makefile(self, *_: Any, **__: Any) -> _Unclosed:  # what http.client.HTTPResponse reads from
        return _Unclosed(self.file)

    def send(self, *requests: bytes) -> None:
        self.sock.sendall(b"".join(requests))

    def answer(self, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
        resp = http.client.HTTPResponse(self, method=method)  # type: ignore[arg-type]
        resp.begin()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _post(path: str, body: dict[str, Any] | bytes, extra: bytes = b"") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), extra, len(data), data))


def _get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path.encode()


def _ready(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)


def _idle(gate: Gate) -> None:
    gate.state.idle()
    with gate.client() as client:
        wait_until("the gate to read IDLE", lambda: client.get("/status").json()["phase"] == "IDLE",
                   CONDITION_DEADLINE_S)


def _content(body: bytes) -> str:
    text: str = json.loads(body)["choices"][0]["message"]["content"]
    return text


def test_one_connection_mixes_plain_and_handed_off_requests_in_order(gate: Gate, vllm: DemoEngine) -> None:
    _ready(gate, vllm)
    conn = _Conn(gate)
    try:
        conn.send(_post("/v1/chat/completions", chat_body(tokens=3)))
        status, _, body = conn.answer()
        assert status == 200 and _content(body), body[:200]
        conn.send(_get("/status"))  # not a plain route: aiohttp answers, on this connection
        status, headers, body = conn.answer("GET")
        assert status == 200 and json.loads(body)["phase"] == "READY", body[:200]
        assert headers["content-type"].startswith("application/json")
        conn.send(_post("/v1/chat/completions", chat_body(tokens=2)))  # aiohttp's from here on
        status, _, body = conn.answer()
        assert status == 200 and _content(body)
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order_across_the_hand_off(gate: Gate, vllm: DemoEngine) -> None:
    _ready(gate, vllm)
    before = vllm.stats()["requests_started"]
    conn = _Conn(gate)
    try:
        # Two plain requests, one for aiohttp, one more plain one: all in one write.
        conn.send(_post("/v1/chat/completions", chat_body(tokens=4)),
                  _post("/v1/chat/completions", chat_body(model="gemma2")),
                  _get("/healthz"),
                  _post("/v1/chat/completions", chat_body(tokens=1)))
        first, second, third, fourth = conn.answer(), conn.answer(), conn.answer("GET"), conn.answer()
    finally:
        conn.close()
    assert first[0] == 200 and _content(first[2])
    assert second[0] == 409 and json.loads(second[2])["error"]["code"] == "model_not_active"
    assert third[0] == 200 and json.loads(third[2])["ok"] is True, third[2][:200]
    assert fourth[0] == 200 and _content(fourth[2])
    assert vllm.stats()["requests_started"] == before + 2, "the 409 never reached the engine"


def test_a_request_pipelined_behind_a_close_is_not_read_and_the_first_is_answered(
        gate: Gate, vllm: DemoEngine) -> None:
    _ready(gate, vllm)
    conn = _Conn(gate)
    try:
        conn.send(_post("/v1/chat/completions", chat_body(tokens=1), extra=b"Connection: close\r\n"),
                  _post("/v1/chat/completions", chat_body(tokens=1)))
        status, headers, _ = conn.answer()
        assert status == 200 and headers["connection"] == "close"
        assert conn.sock.recv(1) == b"", "closed after the answer; the pipelined one is not served"
    finally:
        conn.close()
    with gate.client() as client:
        wait_until("no body budget held for the request that was not served",
                   lambda: client.get("/healthz").json()["body_budget_free_bytes"] == BODY_BUDGET_BYTES,
                   CONDITION_DEADLINE_S)
    conn = _Conn(gate)  # the same on aiohttp's side of the front door
    try:
        conn.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", _get("/healthz"))
        status, headers, body = conn.answer("GET")
        assert status == 200 and json.loads(body)["ok"] is True
        assert conn.sock.recv(1) == b""
    finally:
        conn.close()


@pytest.mark.parametrize("size", [FAST_BODY_MAX - 1024, FAST_BODY_MAX + 1024], ids=["plain", "large"])
def test_bodies_on_both_sides_of_the_plain_limit_reach_the_engine_whole(gate: Gate, vllm: DemoEngine,
                                                                        size: int) -> None:
    _ready(gate, vllm)
    body = chat_body(tokens=2)
    body["messages"] = [{"role": "user", "content": "x" * size}]
    with gate.client() as client:
        resp = client.post("/v1/chat/completions", json=body)
    direct = httpx.post(vllm.url + "/v1/chat/completions", json={**body, "model": VLLM_SERVED},
                        timeout=CONDITION_DEADLINE_S)
    assert resp.status_code == 200 == direct.status_code, resp.text[:300]
    got, sent = resp.json()["usage"]["prompt_tokens"], direct.json()["usage"]["prompt_tokens"]
    assert got == sent > 0, "the engine saw the same prompt through the gate as directly"


def test_a_chunked_request_body_is_re_chunked_for_aiohttp_and_reaches_the_engine(
        gate: Gate, vllm: DemoEngine) -> None:
    _ready(gate, vllm)
    data = json.dumps(chat_body(tokens=2)).encode()
    with gate.client() as client:
        resp = client.post("/v1/chat/completions", content=iter([data[:10], data[10:]]),
                           headers={"Content-Type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked"
    assert resp.status_code == 200 and _content(resp.content), resp.text[:300]


def test_bytes_that_are_not_http_get_400_and_the_connection_is_closed(gate: Gate) -> None:
    _idle(gate)
    conn = _Conn(gate)
    try:
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")  # both framings: a smuggling attempt
        status, headers, _ = conn.answer()
        assert status == 400 and headers["connection"] == "close"
        assert conn.sock.recv(1) == b"", "the connection is closed after the 400"
    finally:
        conn.close()


def test_a_head_that_never_ends_is_cut_at_the_limit_not_buffered(gate: Gate) -> None:
    _idle(gate)
    conn = _Conn(gate)
    try:
        start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        # One byte over, and nothing more: the gate reads every byte before it closes, so its
        # close sends no reset that could discard the answer.
        conn.send(start + b"y" * (MAX_HEAD_BYTES + 1 - len(start)))
        status, headers, body = conn.answer()
        assert status == 431 and json.loads(body)["error"]["code"] == "head_too_large"
        assert headers["connection"] == "close"
    finally:
        conn.close()
    with gate.client() as client:
        assert client.post("/v1/chat/completions", json=chat_body(), headers={"X-Big": "y" * 4000}).status_code == 428


def test_a_428_from_the_front_door_matches_aiohttps_and_counts(gate: Gate) -> None:
    _idle(gate)
    conn = _Conn(gate)
    try:
        conn.send(_post("/v1/chat/completions", chat_body()), _post("/v1/chat/completions", chat_body()))
        plain = [conn.answer(), conn.answer()]  # the second from the cached rendering
        conn.send(_get("/healthz"), _post("/v1/chat/completions", chat_body()))
        conn.answer("GET")
        handed = conn.answer()  # now aiohttp's
    finally:
        conn.close()
    for status, headers, body in [*plain, handed]:
        assert status == 428 and json.loads(body)["error"]["code"] == "no_model_selected"
        assert headers["content-type"] == "application/json; charset=utf-8"
        assert headers["x-ailayer-state-stale"] == "false" and "date" in headers
    assert plain[0][2] == plain[1][2] == handed[2], "the same answer on either path"
    counted = metric(gate, 'ailayer_gate_requests_total{outcome="no_model_selected",route="/v1/chat/completions"}')
    assert counted == 3


def test_a_stalled_large_body_gets_408_from_aiohttps_path_too(procs: Processes, tmp_path: Any,
                                                               vllm: DemoEngine) -> None:
    gate = start_gate(procs, tmp_path, token=TOKEN, client_body_idle_s=1)
    _ready(gate, vllm)
    conn = _Conn(gate)
    try:
        conn.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n{\"model\": " % (FAST_BODY_MAX * 2))
        status, _, body = conn.answer()
    finally:
        conn.close()
    assert status == 408 and b"client_body_idle_s" in body
    assert httpx.get(gate.url + "/healthz", timeout=CONDITION_DEADLINE_S).status_code == 200


def _engine_at(procs: Processes, tmp_path: Any) -> DemoEngine:
    """The catalog's Ollama port, where the test itself decides what (if anything) listens."""
    return DemoEngine(f"http://127.0.0.1:{procs.port_for('ollama')}", tmp_path / "none.log")


def test_an_engine_that_refuses_the_connection_is_502_with_retry_after(gate: Gate, procs: Processes,
                                                                       tmp_path: Any) -> None:
    gate.state.ready(_engine_at(procs, tmp_path), "gemma2", OLLAMA_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/status").json()["phase"] == "READY", CONDITION_DEADLINE_S)
        resp = client.post("/v1/chat/completions", json=chat_body(model="gemma2"))
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "engine_unreachable", resp.text[:300]
    assert int(resp.headers["retry-after"]) >= 1


def test_an_engine_silent_past_the_read_timeout_is_504(procs: Processes, tmp_path: Any) -> None:
    gate = start_gate(procs, tmp_path, token=TOKEN, read_timeout_s=1)
    silent = socket.create_server(("127.0.0.1", procs.port_for("ollama")))  # accepts, never answers
    try:
        gate.state.ready(_engine_at(procs, tmp_path), "gemma2", OLLAMA_SERVED)
        with gate.client() as client:
            wait_until("READY", lambda: client.get("/status").json()["phase"] == "READY", CONDITION_DEADLINE_S)
            resp = client.post("/v1/chat/completions", json=chat_body(model="gemma2"))
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "engine_timeout", resp.text[:300]
        assert "1 s" in resp.json()["error"]["message"]
    finally:
        silent.close()


# A stream far larger than every buffer on the way (two sockets' kernel buffers, the gate's
# 64 KiB read-ahead): only backpressure keeps the engine from sending all of it to an idle client.
FLOOD_BYTES = 128 << 20
FLOOD_PIECE = 1 << 16
BUFFERS_BOUND = 48 << 20


class _Flood(threading.Thread):
    """An engine that streams FLOOD_BYTES as fast as its socket takes them, counting."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", port))
        self.sent = 0

    def run(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Content-Length: %d\r\n\r\n" % FLOOD_BYTES)
            piece = b"x" * FLOOD_PIECE
            with contextlib.suppress(OSError):
                while self.sent < FLOOD_BYTES:
                    conn.sendall(piece)
                    self.sent += len(piece)


def test_a_client_that_stops_reading_holds_the_engine_back_and_loses_nothing(
        gate: Gate, procs: Processes, tmp_path: Any) -> None:
    flood = _Flood(procs.port_for("ollama"))
    flood.start()
    try:
        gate.state.ready(_engine_at(procs, tmp_path), "gemma2", OLLAMA_SERVED)
        with gate.client() as client:
            wait_until("READY", lambda: client.get("/status").json()["phase"] == "READY", CONDITION_DEADLINE_S)
        conn = _Conn(gate)
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        conn.send(_post("/v1/chat/completions", chat_body(model="gemma2")))
        last = [-1, time.monotonic()]

        def stalled() -> bool:
            if flood.sent != last[0]:
                last[:] = [flood.sent, time.monotonic()]
            return flood.sent > 0 and time.monotonic() - last[1] > 0.5

        wait_until("the engine to be held back by the idle client", stalled, CONDITION_DEADLINE_S)
        assert flood.sent < BUFFERS_BOUND, f"{flood.sent >> 20} MiB left the engine for a client reading nothing"
        status, _, body = conn.answer()  # now read it all
        conn.close()
        assert status == 200 and len(body) == FLOOD_BYTES == flood.sent
    finally:
        flood.server.close()


# The gate's SHUTDOWN_GRACE_S, twice (plain requests, then aiohttp's), plus a loaded box's margin.
STOP_DEADLINE_S = 8.0


def test_a_stopping_gate_finishes_a_running_stream_and_takes_no_new_connections(
        gate: Gate, vllm: DemoEngine, procs: Processes) -> None:
    _ready(gate, vllm)
    proc = next(p for p in procs.started if "reconciler.gate" in p.args)  # type: ignore[operator]
    tokens = 20  # 0.6 s of stream: within the grace
    with gate.client() as client, client.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True, tokens=tokens)) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        wait_until("the gate to stop taking connections", lambda: _refused(gate), CONDITION_DEADLINE_S)
        rest = [(0.0, first), *((0.0, line) for line in lines)]
    content = [e for _, e in sse_events(rest) if e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert len(content) == tokens, "the running stream was finished, not cut"
    assert any(line == "data: [DONE]" for _, line in rest), "the stream ended as the engine ended it"
    proc.wait(timeout=STOP_DEADLINE_S)
    assert time.monotonic() - started < STOP_DEADLINE_S


def _refused(gate: Gate) -> bool:
    host, port = gate.url.removeprefix("http://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False
