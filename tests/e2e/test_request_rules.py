"""One table of requests, each sent through both request paths of the gate: the front door
(a plain request: HTTP/1.1, a Content-Length body) and the aiohttp handlers (the same request
with a chunked body, which the front door hands over). The rules both keep live once, in
reconciler/gate/rules.py; this table is what holds them to it (it replaced a hand-kept list at
the top of the front door's module).

A real gate process, demo engines, the observed state written by ``FakeReconciler``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from reconciler.domain.status import Phase
from reconciler.gate.errors import Code
from tests.e2e.standalone_gate import (
    CONDITION_DEADLINE_S,
    OLLAMA_SERVED,
    VLLM_SERVED,
    DemoEngine,
    FakeReconciler,
    Gate,
    Processes,
    chat_body,
)
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

PATHS = ("front door", "aiohttp")


def wait_read(gate: Gate, revision: int) -> None:
    """Until the gate has read the state of ``revision`` (on a connection of its own: a GET
    /status is no inference request, so the front door hands its whole connection to aiohttp)."""
    with gate.client() as client:
        wait_until("the gate to read the state",
                   lambda: client.get("/status").json().get("revision") == revision, CONDITION_DEADLINE_S)


def content(path: str, body: dict[str, Any]) -> bytes | Iterator[bytes]:
    """``body`` as the request path named takes it: a chunked body is handed to aiohttp."""
    raw = json.dumps(body).encode()
    return iter([raw]) if path == "aiohttp" else raw


def served_by(resp: httpx.Response) -> str:
    """Which path answered: aiohttp names itself in a Server header; the front door sends none
    (and drops the engine's)."""
    return "aiohttp" if "aiohttp" in resp.headers.get("Server", "") else "front door"


def send(gate: Gate, path: str, url: str, body: dict[str, Any]) -> httpx.Response:
    """POST ``body`` on a fresh connection, by the request path named."""
    with gate.client() as client:
        return client.post(url, content=content(path, body), headers={"Content-Type": "application/json"})


@dataclass(frozen=True)
class Row:
    """A state, a request, and the answer both paths must give."""

    name: str
    state: Callable[[Gate, DemoEngine, DemoEngine], int]
    url: str
    body: dict[str, Any]
    status: int
    code: Code | None  # the gate's own answer, or None: the engine's
    check: Callable[[httpx.Response], bool] = lambda _resp: True


def ready_vllm(gate: Gate, vllm: DemoEngine, _ollama: DemoEngine) -> int:
    return gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)


def ready_ollama(gate: Gate, _vllm: DemoEngine, ollama: DemoEngine) -> int:
    return gate.state.ready(ollama, "gemma2", OLLAMA_SERVED)


def untrusted(gate: Gate, vllm: DemoEngine, _ollama: DemoEngine) -> int:
    """READY, but routed to a URL the catalog does not name (a planted state file)."""
    revision = gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    data = json.loads(gate.state.path.read_text())
    data["engine"]["url"] = "http://127.0.0.1:9/"
    data["revision"] = revision + 1
    gate.state.path.write_text(json.dumps(data))
    gate.state.revision = revision + 1
    return revision + 1


def served_as(name: str) -> Callable[[httpx.Response], bool]:
    return lambda resp: resp.json().get("model") == name


ROWS = [
    Row("IDLE: nothing selected", lambda gate, *_: gate.state.idle(), "/v1/chat/completions",
        chat_body(), 428, Code.NO_MODEL_SELECTED),
    Row("LOADING: converging", lambda gate, *_: gate.state.loading("gpt-oss"), "/v1/chat/completions",
        chat_body(), 503, Code.MODEL_LOADING),
    Row("READY: the catalog name is mapped to the served name", ready_vllm, "/v1/chat/completions",
        chat_body("gpt-oss"), 200, None, served_as(VLLM_SERVED)),
    Row("READY: another model by name", ready_vllm, "/v1/chat/completions",
        chat_body("gemma2"), 409, Code.MODEL_NOT_ACTIVE),
    Row("READY: a model the catalog does not know", ready_vllm, "/v1/completions",
        {"model": "llama3", "prompt": "hi"}, 409, Code.MODEL_NOT_ACTIVE),
    Row("READY: an Ollama name without its tag", ready_ollama, "/api/chat",
        {"model": "gemma2:9b", "messages": [{"role": "user", "content": "hi"}], "stream": False},
        200, None),
    Row("READY: a state routing to a URL the catalog does not name", untrusted, "/v1/chat/completions",
        chat_body(), 503, Code.UNTRUSTED_STATE),
]


@pytest.fixture
def engines(vllm: DemoEngine, ollama_engine: DemoEngine) -> tuple[DemoEngine, DemoEngine]:
    return vllm, ollama_engine


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_both_paths_answer_alike(row: Row, path: str, gate: Gate,
                                 engines: tuple[DemoEngine, DemoEngine]) -> None:
    wait_read(gate, row.state(gate, *engines))
    resp = send(gate, path, row.url, row.body)
    assert served_by(resp) == path
    assert resp.status_code == row.status, resp.text
    if row.code is not None:
        error = resp.json()["error"]
        assert (error if isinstance(error, str) else error["code"]) and row.code in resp.text
        assert resp.json()["ailayer"]["reason"] == row.code
    assert row.check(resp), resp.text


def test_the_ollama_keep_alive_is_pinned_on_both_paths(gate: Gate, ollama_engine: DemoEngine) -> None:
    """A client's keep_alive: 0 would unload the model behind the reconciler's back."""
    wait_read(gate, gate.state.ready(ollama_engine, "gemma2", OLLAMA_SERVED))
    body = {"model": "gemma2:9b", "prompt": "hi", "stream": False, "keep_alive": 0}
    for path in PATHS:
        resp = send(gate, path, "/api/generate", body)
        assert resp.status_code == 200 and served_by(resp) == path
        loaded = httpx.get(ollama_engine.url + "/api/ps", timeout=CONDITION_DEADLINE_S).json()["models"]
        assert [m["name"] for m in loaded] == [OLLAMA_SERVED], f"{path}: the model was unloaded"


def kill_tree(url: str) -> None:
    """SIGKILL the engine listening at ``url`` and every process under it."""
    port = int(url.rsplit(":", 1)[1])
    owner = next(c.pid for c in psutil.net_connections("tcp")
                 if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid)
    root = psutil.Process(owner)
    for proc in [root, *root.children(recursive=True)]:
        proc.send_signal(signal.SIGKILL)


def silently(state: FakeReconciler, scratch: Path, phase: Phase, **fields: Any) -> None:
    """Write a state the gate has not been told of yet: through a hard link in another
    directory, in place, so its watch on the state directory sees no event (as if the kill
    came a few milliseconds before the gate read the reconciler's STOPPING)."""
    shadow = FakeReconciler(scratch / "state.json", state.revision)
    shadow.write(phase, **fields)
    alias = scratch / "alias"
    os.link(state.path, alias)
    with alias.open("r+b") as handle:
        handle.truncate(0)
        handle.write(shadow.path.read_bytes())
    state.revision = shadow.revision


@pytest.mark.parametrize("path", PATHS)
def test_an_engine_killed_before_the_gate_read_the_switch_ends_its_requests_with_the_switch(
        path: str, gate: Gate, vllm: DemoEngine, procs: Processes, tmp_path: Path) -> None:
    """The reconciler writes STOPPING, then kills. When the kill wins the race against the
    gate's read, the request's engine fails first: it was the switch, not a broken engine
    (CI saw 11 of 20 such requests end engine_error)."""
    wait_read(gate, gate.state.ready(vllm, "gpt-oss", VLLM_SERVED))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with gate.client() as client, client.stream(
            "POST", "/v1/chat/completions", content=content(path, chat_body(stream=True, tokens=400)),
            headers={"Content-Type": "application/json"}) as resp:
        assert served_by(resp) == path
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        silently(gate.state, scratch, Phase.STOPPING, desired_model="gemma2", active_model="gpt-oss")
        kill_tree(vllm.url)
        rest = [line for line in lines if line.startswith("data: ")]
    last = json.loads(rest[-1][6:])
    assert last["error"]["code"] == Code.MODEL_SWITCHED, last


class FixedLengthEngine(threading.Thread):
    """An engine that starts a stream with a declared Content-Length and then goes quiet:
    what a switch ends mid-body. Listens where the catalog says the vLLM engine is."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(CONDITION_DEADLINE_S)
        self.done = threading.Event()

    def run(self) -> None:
        with contextlib.suppress(OSError), self.server:
            conn, _ = self.server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 4096\r\n\r\n"
                             b'data: {"choices": []}\n\n')
                self.done.wait(CONDITION_DEADLINE_S)


@pytest.mark.parametrize("path", PATHS)
def test_a_fixed_length_answer_ended_by_a_switch_is_cut_not_padded(
        path: str, gate: Gate, procs: Processes, tmp_path: Path) -> None:
    """An error item cannot fit in a declared length: the connection is cut, so the client sees
    a truncated answer at once (aiohttp's path wrote the item inside the length, and the
    client waited for the rest)."""
    engine = FixedLengthEngine(procs.port_for("vllm"))
    engine.start()
    try:
        wait_read(gate, gate.state.ready(DemoEngine(f"http://127.0.0.1:{procs.port_for('vllm')}",
                                                    tmp_path / "fixed.log"), "gpt-oss", VLLM_SERVED))
        with gate.client() as client, client.stream(
                "POST", "/v1/chat/completions", content=content(path, chat_body(stream=True)),
                headers={"Content-Type": "application/json"}) as resp:
            assert served_by(resp) == path and resp.headers["Content-Length"] == "4096"
            gate.state.write(Phase.STOPPING, desired_model="gemma2", active_model="gpt-oss")
            with pytest.raises(httpx.RemoteProtocolError):
                resp.read()
    finally:
        engine.done.set()
        engine.join()
