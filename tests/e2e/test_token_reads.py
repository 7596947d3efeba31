"""Issue 25, items 5 and 6: reads of engine output need the token; wrong tokens are rate-limited.

A prompt an engine logged reached anyone who could reach the gate, through ``last_log_line``
in /status and /events and through /logs, with a token configured; and 1,000 wrong tokens
were answered 401 at 1,049 a second. A real gate process, the observed state written by
``FakeReconciler`` (tests/e2e/standalone_gate.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.domain import status
from reconciler.kit import clock
from tests.e2e.standalone_gate import CONDITION_DEADLINE_S, TOKEN, Gate, Processes, start_gate
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

AUTH = {"Authorization": f"Bearer {TOKEN}"}
WRONG = {"Authorization": "Bearer not-the-token-0123456789"}
PROMPT = "user prompt: my secret diagnosis"  # what an engine's log line may carry
LIMIT = 10  # the catalog's default gate.token_failures_per_minute (tests/unit/test_auth.py checks it)


def loading_with_a_prompt(gate: Gate, client: httpx.Client) -> int:
    """A LOADING state whose last_log_line and activity log hold a prompt; returns its revision."""
    with (gate.dir / "activity.log").open("a") as handle:
        handle.write(f"[2026-11-26T10:00:00.000+00:00] [gpt-oss] [4242] {PROMPT}\n")
    boot = status.BootInfo(started_at=clock.iso(), elapsed_s=1.0, budget_s=2700.0,
                           deadline="2030-01-01T00:45:00.000+00:00", attempt=1)
    revision = gate.state.write(status.Phase.LOADING, desired_model="gpt-oss", boot=boot,
                                last_log_line=PROMPT)
    wait_until("the gate to read the state",
               lambda: client.get("/status").json().get("revision") == revision, CONDITION_DEADLINE_S)
    return revision


def first_event(client: httpx.Client, path: str, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """The status code and the first ``data:`` of an SSE route (the stream is then closed)."""
    with client.stream("GET", path, headers=headers) as resp:
        if resp.status_code != 200:
            return resp.status_code, json.loads(resp.read())
        for line in resp.iter_lines():
            if line.startswith("data: "):
                return 200, json.loads(line[6:])
    raise AssertionError(f"{path}: the stream ended before its first event")


# --------------------------------------------------------------------------- item 5


def test_a_token_free_status_keeps_every_field_but_the_engine_output(gate: Gate) -> None:
    with gate.client() as client:
        revision = loading_with_a_prompt(gate, client)
        free = client.get("/status")
        assert free.status_code == 200
        doc = free.json()
        assert "last_log_line" not in doc and PROMPT not in free.text
        assert doc["gate"]["withheld"] == ["last_log_line"]
        assert doc["phase"] == "LOADING" and doc["revision"] == revision and doc["boot"]["attempt"] == 1
        # The README's long-poll loop works without the token.
        polled = client.get("/status", params={"since": revision - 1, "wait": "5s"})
        assert polled.status_code == 200 and polled.json()["revision"] == revision
        full = client.get("/status", headers=AUTH).json()
        assert full["last_log_line"] == PROMPT and "withheld" not in full["gate"]
        wrong = client.get("/status", headers=WRONG)
        assert wrong.status_code == 401 and PROMPT not in wrong.text


def test_logs_need_the_token(gate: Gate) -> None:
    with gate.client() as client:
        loading_with_a_prompt(gate, client)
        status, body = first_event(client, "/logs", {})
        assert status == 401 and PROMPT not in json.dumps(body)
        assert first_event(client, "/logs", WRONG)[0] == 401
        status, body = first_event(client, "/logs", AUTH)
        assert status == 200 and any(line["msg"] == PROMPT for line in body["lines"]), body


def test_events_carry_the_engine_output_only_with_the_token(gate: Gate) -> None:
    with gate.client() as client:
        revision = loading_with_a_prompt(gate, client)
        status, free = first_event(client, "/events", {})
        assert status == 200 and free["revision"] == revision
        assert "last_log_line" not in free and free["gate"]["withheld"] == ["last_log_line"]
        status, full = first_event(client, "/events", AUTH)
        assert status == 200 and full["last_log_line"] == PROMPT
        assert first_event(client, "/events", WRONG)[0] == 401


def test_without_a_token_configured_the_reads_are_as_before(procs: Processes, tmp_path: Path) -> None:
    gate = start_gate(procs, tmp_path)
    with gate.client() as client:
        gate.state.loading("gpt-oss")
        doc = wait_until("LOADING", lambda: (d := client.get("/status").json())["phase"] == "LOADING" and d,
                         CONDITION_DEADLINE_S)
        assert doc["last_log_line"] and "withheld" not in doc["gate"]
        assert first_event(client, "/logs", {})[0] == 200
        assert "last_log_line" in first_event(client, "/events", {})[1]


# --------------------------------------------------------------------------- item 6


def test_wrong_tokens_from_one_address_get_429_and_another_address_does_not(gate: Gate) -> None:
    gate.state.idle()
    other = httpx.Client(base_url=gate.url, timeout=CONDITION_DEADLINE_S,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    with gate.client() as client, other:
        answers = [client.post("/toggle", json={"model": "gpt-oss"}, headers=WRONG).status_code
                   for _ in range(LIMIT)]
        assert answers == [401] * LIMIT
        limited = client.post("/toggle", json={"model": "gpt-oss"}, headers=WRONG)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json()["error"]["code"] == "too_many_token_failures"
        # The right token is refused too until the window ends: a 202 would tell a guesser
        # that the guess the limit stopped was the right one.
        assert client.post("/toggle", json={"model": "gpt-oss"}, headers=AUTH).status_code == 429
        assert client.get("/status", headers=AUTH).status_code == 429
        assert first_event(client, "/logs", AUTH)[0] == 429
        assert not gate.desired_path.exists()
        # Without a header the token-free reads still answer (a long-poll loop is not locked out).
        assert client.get("/status").status_code == 200
        # Another address is counted apart.
        assert other.post("/toggle", json={"model": "gpt-oss"}, headers=WRONG).status_code == 401
        assert other.post("/toggle", json={"model": "gpt-oss"}, headers=AUTH).status_code == 202


def test_the_state_file_is_not_world_readable(gate: Gate) -> None:
    gate.state.idle()
    assert gate.state.path.stat().st_mode & 0o777 == 0o640


def test_a_503_answer_to_a_prompt_never_carries_the_engine_s_last_line(gate: Gate) -> None:
    """Any client may send a prompt, token or not: the 503 while loading says the phase and
    the progress, never the engine's output (it carried last_log_line before)."""
    with gate.client() as client:
        loading_with_a_prompt(gate, client)
        resp = client.post("/v1/chat/completions", json={"model": "gpt-oss", "messages": []})
    assert resp.status_code == 503
    assert resp.json()["ailayer"]["phase"] == "LOADING"
    assert PROMPT not in resp.text and "last_log_line" not in resp.json()["ailayer"]
