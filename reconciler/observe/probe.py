"""HTTP checks against an engine: readiness, the optional JSON check, and the warm-up request."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

from reconciler.domain.catalog import Engine
from reconciler.domain.facts import Probe

# What a dead, slow or hostile engine can make a request raise. http.client's own errors
# (IncompleteRead, BadStatusLine, LineTooLong) are neither OSError nor ValueError, and one
# escaping here failed every pass and killed the warm-up thread for good.
PROBE_ERRORS = (OSError, ValueError, http.client.HTTPException)

# Loopback engines must never be reached through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(url: str, timeout_s: float, method: str = "GET", body: Any = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _timed_out(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, TimeoutError)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (not listening yet)"
    if isinstance(exc, TimeoutError):
        return "probe timed out"
    return f"{type(exc).__name__}: {exc}"


def walk(document: Any, path: str) -> list[Any]:
    """Values at a dotted path; ``*`` fans out over a list (``models.*.name``)."""
    values = [document]
    for part in path.split("."):
        nxt: list[Any] = []
        for value in values:
            if part == "*" and isinstance(value, list):
                nxt.extend(value)
            elif isinstance(value, dict) and part in value:
                nxt.append(value[part])
        values = nxt
    return values


def check(engine: Engine, timeout_s: float | None = None) -> Probe:
    """Readiness: the probe URL's status, then the JSON check if configured.

    ``timeout_s`` (default: the readiness probe's) is per request; after READY the
    liveness timeout applies.

    The JSON check only ever reports ``json_ok``; it never fails the probe. Ollama from
    0.32.4 holds ``/api/ps`` until a load in progress ends, so a JSON check that times out
    means "still loading", not an engine that stopped answering (that would count towards
    liveness failures once READY). Ollama is ready when the warm-up answered done AND
    ``/api/ps`` lists the model; combining the two is the planner's.
    """
    ready = engine.ready
    limit = ready.timeout_s if timeout_s is None else timeout_s
    try:
        status, body = _request(engine.url(ready.url), limit)
    except PROBE_ERRORS as exc:
        return Probe(False, _describe(exc))
    if status != ready.status:
        snippet = body[:120].decode("utf-8", "replace").strip()
        return Probe(False, f"HTTP {status} {snippet}".strip())
    if ready.json_check is None:
        return Probe(True, f"HTTP {status}")
    jc = ready.json_check
    try:
        _, jbody = _request(engine.url(jc.url), limit)
        found = jc.equals in walk(json.loads(jbody), jc.path)
    except PROBE_ERRORS as exc:
        if _timed_out(exc):
            why = f"still loading: {jc.url} did not answer within {limit:g} s (it waits for the load)"
            return Probe(True, f"HTTP {status}; {why}", json_ok=False)
        return Probe(True, f"HTTP {status}; JSON check: {_describe(exc)}", json_ok=False)
    why = "" if found else f"; {jc.equals!r} not yet at {jc.path} of {jc.url}"
    return Probe(True, f"HTTP {status}{why}", json_ok=found)


def warmup(engine: Engine, timeout_s: float) -> str:
    """Send the warm-up request; returns "done" or "failed: <why>". Blocks up to ``timeout_s``."""
    warm = engine.ready.warmup
    if warm is None:
        return "done"
    try:
        status, body = _request(engine.url(warm.url), timeout_s, warm.method, warm.json)
    except PROBE_ERRORS as exc:
        return f"failed: {_describe(exc)}"
    if 200 <= status < 300:
        return "done"
    return f"failed: HTTP {status} {body[:200].decode('utf-8', 'replace').strip()}"
