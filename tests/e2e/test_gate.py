"""The gate end to end: a real gate process, real demo engines, real HTTP.

The reconciler is played by ``FakeReconciler``, which writes the observed-state file
exactly as the real one does (atomically, with a heartbeat), so each test puts the gate
in any phase at once, points it at a demo engine it started itself, and checks what
clients see (tests/e2e/standalone_gate.py; the fixtures are in tests/e2e/conftest.py).
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import yaml

from reconciler.domain import status
from reconciler.domain.status import Phase
from reconciler.gate.bodies import pin_keep_alive
from reconciler.kit import clock
from reconciler.kit.atomicfile import write_atomic
from tests.e2e.standalone_gate import (
    CONDITION_DEADLINE_S,
    OLLAMA_SERVED,
    ROOT,
    TOKEN,
    TOKEN_DELAY_MS,
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

# --------------------------------------------------------------------------- tests


pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

INFERENCE = [
    ("POST", "/v1/chat/completions", {"model": "gpt-oss", "messages": []}),
    ("POST", "/v1/completions", {"model": "gpt-oss", "prompt": "x"}),
    ("POST", "/v1/embeddings", {"model": "gpt-oss", "input": "x"}),
    ("GET", "/v1/models", None),
    ("POST", "/api/generate", {"model": "gemma2", "prompt": "x"}),
    ("POST", "/api/chat", {"model": "gemma2", "messages": []}),
    ("POST", "/api/embed", {"model": "gemma2", "input": "x"}),
    ("GET", "/api/tags", None),
    ("GET", "/api/ps", None),
    ("POST", "/api/show", {"model": "gemma2"}),
]
# A generation long enough (300 tokens x 30 ms = 9 s) that only cancellation ends it early.
LONG_TOKENS = 300
# How quickly the gate must react to a disconnect or a switch. Generous for a loaded box,
# and far below the 9 s the long generation would otherwise take.
PROMPT_S = 2.0


def openai_error(resp: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = resp.json()
    assert isinstance(body["error"], dict), body
    assert {"message", "type", "code"} <= body["error"].keys()
    return body


def timed_lines(resp: httpx.Response) -> list[tuple[float, str]]:
    """Every line with the moment it arrived."""
    out = []
    for line in resp.iter_lines():
        if line:
            out.append((time.monotonic(), line))
    return out


# --------------------------------------------------------------------------- refusals


def test_idle_answers_428_at_once_and_explains(gate: Gate) -> None:
    gate.state.idle()
    with gate.client() as client:
        wait_until("phase IDLE", lambda: client.get("/status").json()["phase"] == "IDLE", CONDITION_DEADLINE_S)
        for method, path, body in INFERENCE:
            took = []
            for _ in range(3):  # the best of three: scheduler noise on a busy CI box aside
                started = time.monotonic()
                resp = client.request(method, path, json=body)
                took.append(time.monotonic() - started)
                assert resp.status_code == 428, (path, resp.text)
            assert min(took) < 0.1, f"{path} took {min(took) * 1000:.1f} ms"
            data = resp.json()
            text = data["error"]["message"] if path.startswith("/v1") else data["error"]
            assert "no model is selected" in text and "toggle" in text, text
            assert "gpt-oss" in text and "gemma2" in text  # the known models
            assert data["ailayer"]["reason"] == "no_model_selected"
        assert resp.headers["X-AILayer-State-Stale"] == "false"


def test_no_state_file_is_503_reconciler_not_running(gate: Gate) -> None:
    with gate.client() as client:
        resp = client.post("/v1/chat/completions", json=chat_body())
        assert resp.status_code == 503
        assert int(resp.headers["Retry-After"]) >= 1
        body = openai_error(resp)
        assert body["error"]["code"] == "reconciler_not_running"
        assert "reconciler not running" in body["error"]["message"]
        st = client.get("/status")
        assert st.json()["stale"] is True and st.json()["phase"] is None
        assert st.headers["X-AILayer-State-Stale"] == "true"


def test_loading_is_503_with_retry_after_and_progress(gate: Gate) -> None:
    gate.state.loading("gpt-oss", elapsed_s=125.0, budget_s=2700.0)
    with gate.client() as client:
        wait_until("LOADING", lambda: client.get("/status").json()["phase"] == "LOADING", CONDITION_DEADLINE_S)
        resp = client.post("/v1/chat/completions", json=chat_body())
        assert resp.status_code == 503
        assert int(resp.headers["Retry-After"]) >= 1
        body = openai_error(resp)
        info = body["ailayer"]
        assert info["phase"] == "LOADING" and info["model"] == "gpt-oss"
        assert info["elapsed_s"] >= 125.0 and info["budget_s"] == 2700.0
        assert info["deadline"] == "2030-01-01T00:45:00.000+00:00"
        assert "loading" in body["error"]["message"] and "2m05s" in body["error"]["message"]
        ollama_resp = client.post("/api/chat", json={"model": "gpt-oss", "messages": []})
        assert ollama_resp.status_code == 503 and "Retry-After" in ollama_resp.headers
        assert isinstance(ollama_resp.json()["error"], str)
        assert "progress" not in info  # nothing parsed yet: absent, not invented


def test_boot_progress_is_in_the_503_status_and_metrics(gate: Gate) -> None:
    shards = {"percent": 40.0, "stage": "loading checkpoint shards (2/5)"}
    gate.state.loading("gpt-oss", progress=shards)
    with gate.client() as client:
        wait_until("LOADING", lambda: client.get("/status").json()["phase"] == "LOADING", CONDITION_DEADLINE_S)
        assert client.get("/status").json()["boot"]["progress"] == shards
        resp = client.post("/v1/chat/completions", json=chat_body())
        assert resp.status_code == 503
        body = openai_error(resp)
        assert body["ailayer"]["progress"] == shards
        assert "stage: loading checkpoint shards (2/5), 40%" in body["error"]["message"]
        assert client.post("/api/chat", json={"model": "gpt-oss", "messages": []}).json()[
            "ailayer"]["progress"] == shards
        assert "ailayer_boot_progress_percent 40.0" in client.get("/metrics").text
        gate.state.idle()
        wait_until("IDLE", lambda: client.get("/status").json()["phase"] == "IDLE", CONDITION_DEADLINE_S)
        assert "ailayer_boot_progress_percent NaN" in client.get("/metrics").text


def test_failed_is_503_with_the_reason(gate: Gate) -> None:
    gate.state.failed("gpt-oss", "BootTimeout", "no answer on /health within 2700 s")
    with gate.client() as client:
        wait_until("FAILED", lambda: client.get("/status").json()["phase"] == "FAILED", CONDITION_DEADLINE_S)
        resp = client.post("/v1/completions", json={"model": "gpt-oss", "prompt": "x"})
        assert resp.status_code == 503 and "Retry-After" in resp.headers
        message = openai_error(resp)["error"]["message"]
        assert "BootTimeout" in message and "no answer on /health within 2700 s" in message


def test_stale_heartbeat_is_visible_everywhere(
    procs: Processes, tmp_path: Any, vllm: DemoEngine
) -> None:
    gate = start_gate(procs, tmp_path, stale_after_s=1.0)
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        # Fresh: the request reaches the engine.
        wait_until("proxying while fresh", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        # The fake reconciler stops writing; its heartbeat ages past 1 s.
        wait_until("stale: true", lambda: client.get("/status").json()["stale"], 5)
        st = client.get("/status")
        assert st.headers["X-AILayer-State-Stale"] == "true"
        assert st.json()["gate"]["reconciler"] == "stale"
        assert client.get("/healthz").headers["X-AILayer-State-Stale"] == "true"
        resp = client.get("/v1/models")
        assert resp.status_code == 503 and "Retry-After" in resp.headers
        assert resp.headers["X-AILayer-State-Stale"] == "true"
        assert "reconciler not running" in resp.json()["error"]["message"]
        assert metric(gate, "ailayer_reconciler_stale") == 1.0
        # A new heartbeat makes it fresh again.
        gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
        wait_until("fresh again", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        # No token configured: toggling over HTTP is off, not open.
        off = client.post("/toggle", json={"model": "gpt-oss"},
                          headers={"Authorization": "Bearer anything"})
        assert off.status_code == 403 and "disabled" in off.json()["error"]["message"]


def test_a_cleanly_stopped_reconciler_is_not_running_at_once(gate: Gate, vllm: DemoEngine) -> None:
    """No waiting for the heartbeat to age (30 s by default): the state says it stopped."""
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("proxying", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        now = clock.iso()
        gate.state.write(status.Phase.READY, desired_model="gpt-oss", active_model="gpt-oss",
                         message=f"reconciler stopped at {now}; it stopped its engines",
                         reconciler={"pid": os.getpid(), "heartbeat": now, "stopped_at": now})
        wait_until("stale at once", lambda: client.get("/status").json()["stale"], 2)
        assert client.get("/status").json()["gate"]["reconciler"] == "stopped"
        resp = client.get("/v1/models")
        assert resp.status_code == 503
        assert resp.json()["error"]["message"].startswith("reconciler not running: reconciler stopped at")


# --------------------------------------------------------------------------- proxying


def test_a_state_file_routing_to_a_url_the_catalog_does_not_name_is_never_proxied(gate: Gate) -> None:
    """A planted observed state must not send prompts (and Authorization headers) elsewhere."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        planted = DemoEngine(f"http://127.0.0.1:{listener.getsockname()[1]}", gate.log)
        gate.state.ready(planted, "gpt-oss", VLLM_SERVED)
        with gate.client() as client:
            answer = wait_until("the planted state refused", lambda: (r := client.post(
                "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer user-key"}))
                .json()["error"]["code"] == "untrusted_state" and r, CONDITION_DEADLINE_S)
        assert answer.status_code == 503 and "does not name" in answer.text
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected to the planted URL


@pytest.mark.parametrize(("host", "expected"), [
    ("evil.example:80", 421), ("127.0.0.1.nip.io", 421),  # DNS rebinding: never answered
    ("localhost:8080", 200), ("127.0.0.1", 200), ("[::1]:8080", 200), ("ai.internal", 200)])
def test_only_loopback_and_configured_host_names_are_answered(procs: Processes, tmp_path: Path,
                                                              host: str, expected: int) -> None:
    gate = start_gate(procs, tmp_path, token=TOKEN, allowed_hosts=["ai.internal"])
    with gate.client() as client:
        answer = client.get("/healthz", headers={"Host": host})
    assert answer.status_code == expected, answer.text
    assert expected == 200 or "gate.allowed_hosts" in answer.json()["error"]["message"]


@pytest.mark.parametrize(("path", "expected"), [
    ("/api/../v1/models", 404), ("/v1/./models", 404), ("/api/%2e%2e/v1/models", 404),  # match no route
    ("/v1/models/%2E%2E/%2E%2E/admin", 400), ("/v1/models/../../api/tags", 400)])  # /v1/models/{name}: refused
def test_dot_segment_paths_are_never_forwarded(gate: Gate, vllm: DemoEngine, path: str, expected: int) -> None:
    """A prefix route would forward the raw path, which the engine might resolve elsewhere."""
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
    host, port = gate.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=CONDITION_DEADLINE_S)
    try:
        conn.request("GET", path)  # sent as written: no client-side normalisation
        answer = conn.getresponse()
        body = answer.read()
        assert answer.status == expected, (answer.status, body[:200])
        assert expected == 404 or b"bad_path" in body
    finally:
        conn.close()


def test_stream_arrives_chunk_by_chunk(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    tokens = 20
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        started = time.monotonic()
        with client.stream("POST", "/v1/chat/completions",
                           json=chat_body(stream=True, tokens=tokens)) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["x-accel-buffering"] == "no"
            lines = timed_lines(resp)
    events = sse_events(lines)
    assert not [e for _, e in events if "error" in e], events
    content = [e for e in events if e[1]["choices"] and e[1]["choices"][0]["delta"].get("content")]
    assert len(content) == tokens
    first, last = content[0][0] - started, content[-1][0] - started
    spread = last - first
    expected = (tokens - 1) * TOKEN_DELAY_MS / 1000
    # Buffering would deliver everything at the end: the spread would be ~0.
    assert spread > 0.5 * expected, f"chunks arrived within {spread:.3f}s (expected ~{expected})"
    assert first < last / 2, f"first token at {first:.3f}s of {last:.3f}s: buffered"
    gaps = sorted(b[0] - a[0] for a, b in itertools.pairwise(content))
    assert gaps[len(gaps) // 2] > 0.3 * TOKEN_DELAY_MS / 1000  # median gap ~ one token
    text = "".join(e[1]["choices"][0]["delta"]["content"] for e in content)
    assert text.startswith("alpha bravo")


def test_client_disconnect_cancels_the_engine_request(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        before = vllm.stats()
        with client.stream("POST", "/v1/chat/completions",
                           json=chat_body(stream=True, tokens=LONG_TOKENS)) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    break  # one token received; now hang up mid-stream
        left = time.monotonic()
    wait_until("the engine to see the stream cancelled",
               lambda: vllm.stats()["requests_cancelled"] > before["requests_cancelled"], PROMPT_S)
    assert time.monotonic() - left < PROMPT_S
    wait_until("no active stream", lambda: vllm.stats()["active_streams"] == 0, PROMPT_S)


def test_client_leaving_before_the_first_byte_cancels_the_engine_request(
    gate: Gate, vllm: DemoEngine
) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
    before = vllm.stats()
    body = json.dumps(chat_body(tokens=LONG_TOKENS)).encode()
    host, port = gate.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_until("the engine to start the request",
                   lambda: vllm.stats()["requests_started"] > before["requests_started"], CONDITION_DEADLINE_S)
    # The socket is closed before any response byte: the engine request must end too.
    wait_until("the engine to see the request cancelled",
               lambda: vllm.stats()["requests_cancelled"] > before["requests_cancelled"], PROMPT_S)


def test_model_mismatch_is_409_naming_the_active_model(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        before = vllm.stats()["requests_started"]
        resp = client.post("/v1/chat/completions", json=chat_body(model="gemma2"))
        assert resp.status_code == 409
        body = openai_error(resp)
        assert "'gpt-oss'" in body["error"]["message"]
        assert "ailayer toggle gemma2" in body["error"]["message"]
        assert body["error"]["param"] == "model"
        assert resp.headers["X-AILayer-Active-Model"] == "gpt-oss"
        unknown = client.post("/api/generate", json={"model": "llama3:8b", "prompt": "x"})
        assert unknown.status_code == 409 and "gpt-oss" in unknown.json()["error"]
        assert "not in the catalog" in unknown.json()["error"]
        assert vllm.stats()["requests_started"] == before  # nothing reached the engine


def test_catalog_name_is_mapped_to_the_served_name(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        # The vLLM-like engine answers 404 to any name but its served name.
        for asked in ("gpt-oss", VLLM_SERVED):
            resp = client.post("/v1/chat/completions", json=chat_body(model=asked))
            assert resp.status_code == 200, resp.text
            assert resp.json()["model"] == VLLM_SERVED
        assert client.get("/v1/models").json()["data"][0]["id"] == VLLM_SERVED


def test_openai_client_works_unchanged(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    client = openai.OpenAI(base_url=gate.url + "/v1", api_key="unused")
    wait_until("models", lambda: [m.id for m in client.models.list()] == [VLLM_SERVED], CONDITION_DEADLINE_S)
    chat = client.chat.completions.create(
        model="gpt-oss", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.choices[0].message.content == "alpha bravo charlie delta"
    stream = client.chat.completions.create(
        model="gpt-oss", messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True)
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "alpha bravo charlie delta echo"
    text = client.completions.create(model=VLLM_SERVED, prompt="x", max_tokens=2)
    assert text.choices[0].text == "alpha bravo"
    emb = client.embeddings.create(model="gpt-oss", input="hello")
    assert len(emb.data[0].embedding) == 16
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="gemma2", messages=[], max_tokens=1)
    assert info.value.status_code == 409 and "gpt-oss" in info.value.message


def test_ollama_client_works_unchanged(gate: Gate, ollama_engine: DemoEngine) -> None:
    gate.state.ready(ollama_engine, "gemma2", OLLAMA_SERVED)
    client = ollama.Client(host=gate.url)
    wait_until("tags", lambda: [m.model for m in client.list().models] == [OLLAMA_SERVED], CONDITION_DEADLINE_S)
    assert [m.model for m in client.ps().models] == [OLLAMA_SERVED]
    reply = client.chat(model="gemma2", messages=[{"role": "user", "content": "hi"}],
                        options={"num_predict": 3})
    assert reply.message.content == "alpha bravo charlie"
    arrivals: list[float] = []
    text = ""
    for part in client.generate(model=OLLAMA_SERVED, prompt="x", stream=True,
                                options={"num_predict": 10}):
        arrivals.append(time.monotonic())
        text += part.response or ""
    assert text.startswith("alpha bravo charlie") and len(text.split()) == 10
    assert arrivals[-2] - arrivals[0] > 0.5 * 8 * TOKEN_DELAY_MS / 1000  # chunk by chunk
    assert len(client.embed(model="gemma2", input="hello").embeddings[0]) == 16
    assert client.show("gemma2") is not None
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="gpt-oss", messages=[])
    assert info.value.status_code == 409 and "gemma2" in info.value.error


def test_a_client_keep_alive_cannot_unload_the_model(gate: Gate, ollama_engine: DemoEngine) -> None:
    """The gate pins keep_alive to -1 on Ollama's routes: only the reconciler unloads."""
    gate.state.ready(ollama_engine, "gemma2", OLLAMA_SERVED)
    ask = {"num_predict": 2}
    hi = [{"role": "user", "content": "hi"}]
    with gate.client() as client:
        wait_until("the gate to proxy", lambda: client.get("/api/tags").status_code == 200, CONDITION_DEADLINE_S)
        unload = client.post("/api/generate", json={"model": "gemma2", "keep_alive": 0})
        assert unload.status_code == 200 and unload.json()["done_reason"] == "load", unload.text
        for path, body in (
            ("/api/generate", {"model": "gemma2", "prompt": "x", "stream": False, "options": ask}),
            ("/api/chat", {"model": OLLAMA_SERVED, "messages": hi, "options": ask}),  # streamed
            ("/api/embed", {"model": "gemma2", "input": "x"}),
            ("/api/embeddings", {"model": "gemma2", "prompt": "x"}),
        ):
            resp = client.post(path, json={**body, "keep_alive": "0s"})
            assert resp.status_code == 200, (path, resp.text)
    engine_ps = httpx.get(ollama_engine.url + "/api/ps", timeout=5).json()["models"]
    assert [(m["name"], m["expires_at"][:2]) for m in engine_ps] == [(OLLAMA_SERVED, "23")], "kept forever"
    # The control: the same request straight to the engine does unload it.
    direct = {"model": OLLAMA_SERVED, "prompt": "x", "stream": False, "options": ask, "keep_alive": 0}
    assert httpx.post(ollama_engine.url + "/api/generate", json=direct, timeout=10).status_code == 200
    wait_until("the engine to unload on a keep_alive it was really sent",
               lambda: httpx.get(ollama_engine.url + "/api/ps", timeout=5).json()["models"] == [], CONDITION_DEADLINE_S)


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"model":"gemma2","prompt":"x"}', {"model": "gemma2", "prompt": "x"}),
    (b'  {  }', {}),
    (b'{"model":"gemma2","keep_alive":0}', {"model": "gemma2"}),
    (b'{"model":"gemma2","KEEP_ALIVE":"0s","keep_alive":"5m"}', {"model": "gemma2"}),
    (b'{"model":"gemma2","keep\\u005falive":0}', {"model": "gemma2"}),
    ('{"model":"gemma2","\u212aeep_alive":0}'.encode(), {"model": "gemma2"}),  # Kelvin sign folds to k
    (b'{"prompt":"say keep_alive"}', {"prompt": "say keep_alive"}),
])  # fmt: skip
def test_pin_keep_alive_replaces_every_spelling(body: bytes, expected: dict[str, Any]) -> None:
    """Go's encoding/json matches keys case-insensitively and after unescaping, as Ollama reads them."""
    assert json.loads(pin_keep_alive(body)) == {**expected, "keep_alive": -1}


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"keep_alive"'])
def test_pin_keep_alive_leaves_what_is_not_an_object(body: bytes) -> None:
    assert pin_keep_alive(body) == body


# --------------------------------------------------------------------------- switches


def test_switch_ends_an_in_flight_stream_with_an_error_event(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        with client.stream("POST", "/v1/chat/completions",
                           json=chat_body(stream=True, tokens=LONG_TOKENS)) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            gate.state.write(Phase.STOPPING, desired_model="gemma2", active_model="gpt-oss")
            switched = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        took = time.monotonic() - switched
    assert took < PROMPT_S, f"stream ended {took:.2f}s after the switch"
    last = json.loads(rest[-1][6:])
    assert last["error"]["code"] == "model_switched", last
    assert "stopped being served" in last["error"]["message"]
    wait_until("engine stream cancelled", lambda: vllm.stats()["active_streams"] == 0, CONDITION_DEADLINE_S)


def test_switch_fails_in_flight_requests_promptly_for_both_clients(
    gate: Gate, vllm: DemoEngine, ollama_engine: DemoEngine
) -> None:
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    oai = openai.OpenAI(base_url=gate.url + "/v1", api_key="unused", max_retries=0)
    wait_until("READY", lambda: oai.models.list().data, CONDITION_DEADLINE_S)
    outcome: dict[str, Any] = {}

    def non_streamed() -> None:
        try:
            oai.chat.completions.create(model="gpt-oss", messages=[], max_tokens=LONG_TOKENS)
        except openai.APIStatusError as exc:
            outcome["error"], outcome["at"] = exc, time.monotonic()

    before = vllm.stats()["requests_started"]
    worker = threading.Thread(target=non_streamed)
    worker.start()
    stream = oai.chat.completions.create(model="gpt-oss", messages=[], max_tokens=LONG_TOKENS,
                                         stream=True)
    assert next(iter(stream)).choices  # the stream is running
    wait_until("both requests running", lambda: vllm.stats()["requests_started"] >= before + 2, CONDITION_DEADLINE_S)
    # The reconciler moves to the other engine while both requests are in flight.
    gate.state.ready(ollama_engine, "gemma2", OLLAMA_SERVED)
    switched = time.monotonic()
    with pytest.raises(openai.APIError, match="stopped being served"):
        for _ in stream:
            pass
    assert time.monotonic() - switched < PROMPT_S
    worker.join(timeout=PROMPT_S)
    assert not worker.is_alive(), "the non-streamed request hangs"
    err = outcome["error"]
    assert err.status_code == 503 and "stopped being served" in err.message
    assert outcome["at"] - switched < PROMPT_S

    # And the Ollama side: a streamed chat in flight when the state goes to STOPPING.
    client = ollama.Client(host=gate.url)
    wait_until("READY on the Ollama-like engine", lambda: client.ps().models, CONDITION_DEADLINE_S)
    parts = client.chat(model="gemma2", messages=[{"role": "user", "content": "hi"}],
                        stream=True, options={"num_predict": LONG_TOKENS})
    assert next(parts).message.content
    gate.state.write(Phase.STOPPING, desired_model=None, active_model="gemma2")
    switched = time.monotonic()
    with pytest.raises(ollama.ResponseError, match="stopped being served"):
        for _ in parts:
            pass
    assert time.monotonic() - switched < PROMPT_S


# --------------------------------------------------------------------------- status


def test_long_poll_returns_on_change_and_on_timeout(gate: Gate) -> None:
    gen = gate.state.idle()
    with gate.client() as client:
        wait_until("first state", lambda: client.get("/status").json()["revision"] == gen, CONDITION_DEADLINE_S)
        assert client.get("/status").headers["X-AILayer-Revision"] == str(gen)
        # A revision the client has not seen: answered at once.
        started = time.monotonic()
        assert client.get("/status", params={"wait": 30, "since": gen - 1}).json()[
            "revision"] == gen
        assert time.monotonic() - started < 0.5
        # No change: answered at ``wait``, with the same revision.
        started = time.monotonic()
        same = client.get("/status", params={"wait": "0.3s", "since": gen})
        took = time.monotonic() - started
        assert same.json()["revision"] == gen and 0.25 <= took < 2.0, took
        # A change while waiting: answered at the change.
        result: dict[str, Any] = {}

        def waiter() -> None:
            with gate.client() as own:
                result["resp"] = own.get("/status", params={"wait": 20, "since": gen})
                result["at"] = time.monotonic()

        thread = threading.Thread(target=waiter)
        thread.start()
        wait_until("the poll to wait", lambda: metric(gate, "ailayer_gate_watchers") == 1.0, CONDITION_DEADLINE_S)
        new = gate.state.loading("gemma2")
        changed = time.monotonic()
        thread.join(timeout=5)
        assert result["resp"].json()["revision"] == new
        assert result["resp"].json()["phase"] == "LOADING"
        assert result["at"] - changed < 1.0
        bad = client.get("/status", params={"wait": "soon", "since": gen})
        assert bad.status_code == 400
        # Over the cap (below nginx's 60 s proxy_read_timeout): cut, and the answer says so.
        capped = client.get("/status", params={"wait": "600s", "since": gen - 1})
        assert capped.headers["X-AILayer-Wait-Capped"] == "55"
        assert "X-AILayer-Wait-Capped" not in client.get("/status", params={"wait": 30, "since": 0}).headers


def test_every_hint_names_the_revision_that_since_compares(gate: Gate) -> None:
    rev = gate.state.idle()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with gate.client() as client:
        wait_until("first state", lambda: client.get("/status").json().get("revision") == rev, CONDITION_DEADLINE_S)
        idle = client.post("/v1/chat/completions", json={"model": "gpt-oss", "messages": []})
        assert idle.status_code == 428 and "since=REVISION" in idle.text and "GENERATION" not in idle.text
        # Every counter the gate hands out is that revision, and named so: a UI that passed a
        # "generation" as since= would busy-poll (it counts toggles, not state changes).
        assert idle.json()["ailayer"]["revision"] == rev and "generation" not in idle.json()["ailayer"]
        state = client.get("/status")
        assert state.json()["gate"]["revision"] == rev and "generation" not in state.json()["gate"]
        assert state.headers["X-AILayer-Revision"] == str(rev)
        assert client.get("/healthz").json()["revision"] == rev
        accepted = client.post("/toggle", json={"model": "gpt-oss"}, headers=auth)
        assert accepted.status_code == 202
        body = accepted.json()
        assert body["revision"] == rev and "since=REVISION" in body["follow"]
        gate.state.loading("gpt-oss")
        wait_until("LOADING", lambda: client.get("/status").json()["phase"] == "LOADING", CONDITION_DEADLINE_S)
        busy = client.post("/v1/chat/completions", json=chat_body()).json()["ailayer"]
        assert busy["revision"] == rev + 1 and "generation" not in busy


def test_events_stream_delivers_changes(gate: Gate) -> None:
    gen = gate.state.idle()
    with gate.client() as client:
        wait_until("first state", lambda: client.get("/status").json().get("revision") == gen, CONDITION_DEADLINE_S)
        with client.stream("GET", "/events") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-cache"
            lines = resp.iter_lines()

            def next_event() -> tuple[str, dict[str, Any]]:
                ident = ""
                for line in lines:
                    if line.startswith("id: "):
                        ident = line[4:]
                    if line.startswith("data: "):
                        return ident, json.loads(line[6:])
                raise AssertionError("stream ended")

            ident, data = next_event()
            assert ident == str(gen) and data["phase"] == "IDLE"
            new = gate.state.loading("gpt-oss")
            ident, data = next_event()
            assert ident == str(new) and data["phase"] == "LOADING"
            assert data["desired_model"] == "gpt-oss"


def test_a_model_added_to_the_catalog_is_accepted_without_a_restart(gate: Gate) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with gate.client() as client:
        before = client.post("/toggle", json={"model": "llama3"}, headers=auth)
        assert before.status_code == 422
        doc = yaml.safe_load(gate.catalog.read_text())
        doc["engines"]["llama3"] = {"kind": "llamacpp", "command": ["{python}", "-c", "pass"], "port": 18099}
        write_atomic(gate.catalog, yaml.safe_dump(doc))
        after = wait_until("the gate to take the new model", lambda: (r := client.post(
            "/toggle", json={"model": "llama3"}, headers=auth)).status_code == 202 and r, CONDITION_DEADLINE_S)
        assert after.json()["model"] == "llama3"


def test_toggle_needs_the_token_and_a_known_model(gate: Gate) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with gate.client() as client:
        none = client.post("/toggle", json={"model": "gpt-oss"})
        assert none.status_code == 401 and "Bearer" in none.headers["WWW-Authenticate"]
        wrong = client.post("/toggle", json={"model": "gpt-oss"},
                            headers={"Authorization": "Bearer not-the-token"})
        assert wrong.status_code == 401
        assert not gate.desired_path.exists()
        unknown = client.post("/toggle", json={"model": "llama3"}, headers=auth)
        assert unknown.status_code == 422
        assert unknown.json()["ailayer"]["known_models"] == ["gemma2", "gpt-oss"]
        assert "gemma2, gpt-oss" in unknown.json()["error"]["message"]
        assert client.post("/toggle", json={}, headers=auth).status_code == 400
        assert not gate.desired_path.exists()
        ok = client.post("/toggle", json={"model": "gpt-oss"}, headers=auth)
        assert ok.status_code == 202 and ok.json()["generation"] == 1
        doc = yaml.safe_load(gate.desired_path.read_text())
        assert doc["model"] == "gpt-oss" and doc["generation"] == 1
        assert "via http" in doc["requested_by"]
        off = client.post("/toggle", json={"model": None}, headers=auth)
        assert off.status_code == 202
        doc = yaml.safe_load(gate.desired_path.read_text())
        assert doc["model"] is None and doc["generation"] == 2


def test_healthz_and_metrics(gate: Gate, vllm: DemoEngine) -> None:
    gate.state.idle()
    with gate.client() as client:
        wait_until("IDLE", lambda: client.post("/v1/completions", json={}).status_code == 428, CONDITION_DEADLINE_S)
        gate.state.loading("gpt-oss")
        wait_until("LOADING", lambda: client.get("/status").json()["phase"] == "LOADING", CONDITION_DEADLINE_S)
        gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
        with client.stream("POST", "/v1/completions",
                           json={"model": "gpt-oss", "prompt": "x", "max_tokens": 2,
                                 "stream": True}) as resp:
            resp.read()
        health = client.get("/healthz").json()
        assert health["ok"] is True and health["reconciler"] == "running"
        assert health["phase"] == "READY"
        text = client.get("/metrics").text
    assert 'ailayer_phase{ailayer_phase="READY"} 1.0' in text
    assert 'ailayer_gate_requests_total{outcome="no_model_selected",route="/v1/completions"}' in text
    assert 'ailayer_gate_requests_total{outcome="proxied",route="/v1/models"}' in text
    assert 'ailayer_gate_streams_total{outcome="completed"} 1.0' in text
    assert "ailayer_switches_total 1.0" in text
    assert "ailayer_engine_restarts 0.0" in text
    assert "ailayer_boot_duration_seconds_count 1.0" in text


def test_the_gate_raises_its_soft_fd_limit_to_the_hard_one() -> None:
    """systemd's default soft limit (1,024) let 10,000 slow connections starve health checks."""
    code = ("import resource; soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)); "
            "from reconciler.gate.app import raise_fd_limit; print(raise_fd_limit(), hard)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    now, hard = map(int, out.stdout.split())
    assert now == hard > 256, out.stderr


def _slow_head(url: str) -> socket.socket:
    """A connection that sends a request head one header line at a time, never finishing it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=CONDITION_DEADLINE_S)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"X-Slow: 1\r\n")
        sock.settimeout(0.05)
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_a_client_that_never_finishes_its_head_is_dropped_and_others_are_served(
        procs: Processes, tmp_path: Path) -> None:
    """Slowloris: aiohttp has no header timeout, so such connections were held for good."""
    gate = start_gate(procs, tmp_path, token=TOKEN, client_header_timeout_s=1)
    gate.state.idle()
    slow = [_slow_head(gate.url) for _ in range(50)]
    try:
        with gate.client() as client:
            waited = client.get("/status", params={"wait": "3s", "since": "999"})  # 3 s on one connection
            assert waited.status_code == 200, "a connection that sent its request is never cut"
            assert client.get("/healthz").status_code == 200
        started = time.monotonic()
        wait_until("every slow head to be dropped", lambda: all(_closed_by_peer(s) for s in slow),
                   CONDITION_DEADLINE_S)
        assert time.monotonic() - started < CONDITION_DEADLINE_S
    finally:
        for sock in slow:
            sock.close()


def test_a_stalled_request_body_gets_408_and_never_reaches_the_engine(
        procs: Processes, tmp_path: Path, vllm: DemoEngine) -> None:
    gate = start_gate(procs, tmp_path, token=TOKEN, client_body_idle_s=1)
    gate.state.ready(vllm, "gpt-oss", VLLM_SERVED)
    with gate.client() as client:
        wait_until("READY", lambda: client.get("/v1/models").status_code == 200, CONDITION_DEADLINE_S)
    before = vllm.stats()["requests_started"]
    host, port = gate.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=CONDITION_DEADLINE_S) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": ")
        started = time.monotonic()
        answer = sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 0.9 < time.monotonic() - started < CONDITION_DEADLINE_S
        while b"client_body_idle_s" not in answer and (more := sock.recv(4096)):
            answer += more
        assert b"client_body_idle_s" in answer
    assert vllm.stats()["requests_started"] == before
