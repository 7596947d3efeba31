"""How the front door relays an engine's answer (reconciler/gate/frontdoor.py ``_new_shape``),
pinned from a fixture table: which headers the client gets, the framing, whole or streamed.
"""

from __future__ import annotations

import pytest

from reconciler.gate.frontdoor import _new_shape, routes_of

Headers = list[tuple[bytes, bytes]]


JSON = [(b"Content-Type", b"application/json"), (b"Content-Length", b"2")]

CASES: list[tuple[str, int, Headers, bool, tuple[bool, bool, bool], bytes]] = [
    ("a small JSON answer is read whole; its length kept; the engine's Date/Server/Connection dropped",
     200, [(b"Server", b"uvicorn"), (b"Date", b"x"), *JSON, (b"Connection", b"keep-alive")], False,
     (True, False, False),
     b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: "),
    ("an SSE stream without a length is chunked, unbuffered; the engine's Cache-Control replaced",
     200, [(b"Content-Type", b"text/event-stream"), (b"Cache-Control", b"max-age=60"),
           (b"Transfer-Encoding", b"chunked")], False,
     (False, True, True),
     b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
     b"X-Accel-Buffering: no\r\nTransfer-Encoding: chunked\r\nDate: "),
    ("NDJSON with a length is a stream with that length, not chunked",
     200, [(b"Content-Type", b"application/x-ndjson"), (b"Content-Length", b"10")], False,
     (False, False, True),
     b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nCache-Control: no-cache\r\n"
     b"X-Accel-Buffering: no\r\nContent-Length: 10\r\nDate: "),
    ("a large answer of known length is relayed as it comes, with its length",
     200, [(b"Content-Type", b"application/json"), (b"Content-Length", b"5000000")], False,
     (False, False, False),
     b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\nDate: "),
    ("headers the engine's Connection names are hop-by-hop and dropped",
     200, [*JSON, (b"Connection", b"close, X-Secret"), (b"X-Secret", b"s"), (b"X-Kept", b"k")], False,
     (True, False, False),
     b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Kept: k\r\nContent-Length: 2\r\nDate: "),
    ("an error status keeps the engine's reason and body",
     400, [*JSON], False, (True, False, False),
     b"HTTP/1.1 400 Nope\r\nContent-Type: application/json\r\nContent-Length: 2\r\nDate: "),
    ("204 has no body and no length",
     204, [], True, (True, False, False), b"HTTP/1.1 204 OK\r\nDate: "),
]


@pytest.mark.parametrize(("why", "status", "headers", "bodyless", "flags", "head"), CASES, ids=[c[0] for c in CASES])
def test_the_answer_is_relayed_as_pinned(why: str, status: int, headers: Headers, bodyless: bool,
                                         flags: tuple[bool, bool, bool], head: bytes) -> None:
    reason = b"Nope" if status == 400 else b"OK"
    shape = _new_shape(status, reason, bodyless, tuple(headers))
    assert (shape.whole, shape.chunked, shape.streaming) == flags, why
    assert shape.head == head, why


def test_an_empty_reason_gets_the_standard_phrase() -> None:
    assert _new_shape(404, b"", False, tuple(JSON)).head.startswith(b"HTTP/1.1 404 Not Found\r\n")


def test_only_routes_of_fixed_path_take_the_plain_path() -> None:
    routes = routes_of([("POST", "/v1/chat/completions", "openai", "model"),
                        ("GET", "/v1/models/{name:.+}", "openai", None)])
    assert routes == {(b"POST", b"/v1/chat/completions"): ("/v1/chat/completions", "openai", "model")}
