"""HTTP checks against an engine: readiness and the optional JSON check. Read-only: GETs only
(the warm-up request, which makes Ollama load a model, is ``reconciler.act.warmup``'s)."""

from __future__ import annotations

import json
from typing import Any

from reconciler.domain.catalog import Engine
from reconciler.domain.facts import Probe
from reconciler.kit.loopback import ERRORS, describe, request, timed_out


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
        status, body = request(engine.url(ready.url), limit)
    except ERRORS as exc:
        return Probe(False, describe(exc))
    if status != ready.status:
        snippet = body[:120].decode("utf-8", "replace").strip()
        return Probe(False, f"HTTP {status} {snippet}".strip())
    if ready.json_check is None:
        return Probe(True, f"HTTP {status}")
    jc = ready.json_check
    try:
        _, jbody = request(engine.url(jc.url), limit)
        found = jc.equals in walk(json.loads(jbody), jc.path)
    except ERRORS as exc:
        if timed_out(exc):
            why = f"still loading: {jc.url} did not answer within {limit:g} s (it waits for the load)"
            return Probe(True, f"HTTP {status}; {why}", json_ok=False)
        return Probe(True, f"HTTP {status}; JSON check: {describe(exc)}", json_ok=False)
    why = "" if found else f"; {jc.equals!r} not yet at {jc.path} of {jc.url}"
    return Probe(True, f"HTTP {status}{why}", json_ok=found)

