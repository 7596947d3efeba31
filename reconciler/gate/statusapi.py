"""State for UIs and monitoring: GET /status (with Consul-style long-poll), /events, /healthz.

A UI follows a 35-minute boot with a chain of short requests, none of which outlives a
proxy's timeout: ``GET /status?wait=50&since=REVISION`` answers at once if the observed
state's ``revision`` moved past REVISION, otherwise at the next change, otherwise after
``wait``. ``revision`` is the one counter to follow (the desired ``generation`` counts
toggles, not state changes).

With a token configured, engine output (``last_log_line``, which can hold a prompt) is shown
only to a request with ``Authorization: Bearer TOKEN`` (reconciler/gate/auth.py). Without the
header, /status and /events answer every other field, so a long-poll loop needs no token, and
say what they left out in ``gate.withheld``; a wrong token gets 401 (and is counted), not the
token-free view, so a guess cannot pass unnoticed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Callable

from aiohttp import web

from reconciler.gate import auth, errors
from reconciler.gate.auth import Access, Decision, Guard
from reconciler.gate.errors import Code, Refusal
from reconciler.gate.metrics import GateMetrics
from reconciler.gate.statefollow import Snapshot, StateFollower
from reconciler.kit import clock

# Fields of the observed state that carry engine output: shown with the token only.
WITHHELD = ("last_log_line",)

# The longest a blocking query is held: below nginx's default proxy_read_timeout (60 s), so a
# long-poll behind a default nginx never gets a 504. A longer ``wait`` is cut to this, and
# the answer says so (X-AILayer-Wait-Capped).
MAX_WAIT_S = 55.0
WAIT_CAPPED_HEADER = "X-AILayer-Wait-Capped"
# When ``since`` comes without ``wait``: under nginx's default proxy_read_timeout (60 s).
DEFAULT_WAIT_S = 50.0
# A comment line this often keeps an idle /events stream alive through proxies
# (nginx closes after 60 s of silence by default) and lets clients detect a dead gate.
EVENTS_HEARTBEAT_S = 15.0
# How long an EventSource waits before reconnecting after the stream ends.
EVENTS_RETRY_MS = 2000

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(raw: str) -> float:
    """``30``, ``30s``, ``1.5m``, ``500ms`` → seconds (Consul accepts the same forms)."""
    match = _DURATION.match(raw)
    if match is None:
        raise ValueError(f"not a duration: {raw!r} (use seconds, e.g. 30 or 30s or 5m)")
    return float(match.group(1)) * _UNIT[match.group(2)]


def render(follower: StateFollower, state_json: str, withheld: tuple[str, ...] = ()) -> str:
    """The observed state (``state_json``, the follower's or one without ``withheld``) plus the
    gate's verdict on it, as one line of JSON."""
    snap = follower.snapshot
    age = follower.heartbeat_age()
    gate = {
        "revision": snap.revision,
        "reconciler": follower.reconciler_state(),
        "heartbeat_age_s": None if age == float("inf") else round(age, 3),
        "stale_after_s": follower.stale_after_s,
        "state_file": str(follower.path),
        "read_error": follower.read_error,
        "pid": os.getpid(),  # which gate worker answered (gate.workers)
    }
    if withheld:
        gate["withheld"] = list(withheld)  # "send the token to see these"
    head = '{"stale":%s,"gate":%s' % (  # noqa: UP031 (splicing cached JSON, not formatting)
        "true" if follower.stale() else "false", json.dumps(gate, separators=(",", ":")))
    if snap.data is None:
        return head + ',"phase":null}'
    return head + "," + state_json[1:]


def state_headers(follower: StateFollower) -> dict[str, str]:
    return {
        errors.STALE_HEADER: "true" if follower.stale() else "false",
        errors.REVISION_HEADER: str(follower.revision),
        errors.PHASE_HEADER: follower.snapshot.phase or "none",
        **errors.NO_BUFFERING,
    }


class StatusApi:
    """Handlers that only read the followed state."""

    def __init__(
        self, follower: StateFollower, metrics: GateMetrics, inflight: Callable[[], int],
        budget_free: Callable[[], int], guard: Guard,
    ) -> None:
        self._guard = guard
        self._public: tuple[Snapshot, str] | None = None  # the last state without WITHHELD
        self._follower = follower
        self._metrics = metrics
        self._inflight = inflight
        self._budget_free = budget_free

    def _bad(self, message: str) -> web.Response:
        return self._refuse(Refusal(400, Code.BAD_QUERY, message))

    def _refuse(self, refusal: Refusal) -> web.Response:
        return errors.respond(refusal, errors.OPENAI, stale=self._follower.stale())

    def _access(self, request: web.Request) -> Decision | Refusal:
        """Who may see what: no header is the token-free view; a wrong token is refused."""
        decision = self._guard.check(request.headers.get("Authorization"), request.remote)
        if decision.access is Access.ANONYMOUS:
            return decision
        return auth.refusal(decision, f"engine output in GET {request.path} (send no token for the rest)") or decision

    def _text(self, decision: Decision) -> str:
        follower = self._follower
        if decision.may_read:
            return render(follower, follower.snapshot.json_text)
        snap = follower.snapshot
        if self._public is None or self._public[0] is not snap:
            public = {} if snap.data is None else {k: v for k, v in snap.data.items() if k not in WITHHELD}
            self._public = (snap, json.dumps(public, separators=(",", ":")))
        return render(follower, self._public[1], WITHHELD)

    async def status(self, request: web.Request) -> web.Response:
        follower = self._follower
        decision = self._access(request)
        if isinstance(decision, Refusal):
            self._metrics.request("/status", decision.code)
            return self._refuse(decision)
        try:
            since = int(request.query["since"]) if "since" in request.query else None
            wait = parse_duration(request.query["wait"]) if "wait" in request.query else None
        except ValueError as exc:
            return self._bad(f"bad long-poll query: {exc}")
        asked = DEFAULT_WAIT_S if wait is None else wait
        if since is not None and since == follower.revision and not follower.closing:
            await self._wait(min(MAX_WAIT_S, asked))
        self._metrics.request("/status", Code.OK)
        headers = state_headers(follower)
        if asked > MAX_WAIT_S:
            headers = {**headers, WAIT_CAPPED_HEADER: f"{MAX_WAIT_S:g}"}
        return web.Response(text=self._text(decision), content_type="application/json", headers=headers)

    async def _wait(self, seconds: float) -> None:
        change = self._follower.change_event()
        self._metrics.waiters.inc()
        try:
            async with asyncio.timeout(clock.real_seconds(seconds)):
                await change.wait()
        except TimeoutError:
            pass
        finally:
            self._metrics.waiters.dec()

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the state now, then at every change, with heartbeat comments."""
        follower = self._follower
        decision = self._access(request)
        if isinstance(decision, Refusal):
            self._metrics.request("/events", decision.code)
            return self._refuse(decision)
        headers = {"Content-Type": "text/event-stream", **state_headers(follower)}
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        self._metrics.request("/events", Code.OK)
        self._metrics.waiters.inc()
        try:
            change = follower.change_event()
            await resp.write(f"retry: {EVENTS_RETRY_MS}\n\n".encode() + self._event(decision))
            while not follower.closing:
                try:
                    async with asyncio.timeout(clock.real_seconds(EVENTS_HEARTBEAT_S)):
                        await change.wait()
                except TimeoutError:
                    await resp.write(f": heartbeat {clock.iso()}\n\n".encode())
                    continue
                change = follower.change_event()
                if not follower.closing:
                    await resp.write(self._event(decision))
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away
        finally:
            self._metrics.waiters.dec()
        return resp

    def _event(self, decision: Decision) -> bytes:
        revision = self._follower.revision
        return f"event: status\nid: {revision}\ndata: {self._text(decision)}\n\n".encode()

    async def healthz(self, _: web.Request) -> web.Response:
        """The gate itself is up; the reconciler's state is reported, not judged, here."""
        follower = self._follower
        body = {
            "ok": True,
            "reconciler": follower.reconciler_state(),
            "stale": follower.stale(),
            "phase": follower.snapshot.phase,
            "revision": follower.revision,
            "inflight": self._inflight(),
            # Request-body bytes this worker could still hold (budget.BODY_BUDGET_BYTES when idle).
            "body_budget_free_bytes": self._budget_free(),
        }
        return web.json_response(body, headers=state_headers(follower))
