"""HTTP to an engine on this machine: the probes (observe/) and the warm-up (act/) send through it."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any

# What a dead, slow or hostile engine can make a request raise. http.client's own errors
# (IncompleteRead, BadStatusLine, LineTooLong) are neither OSError nor ValueError, and one
# escaping here failed every pass and killed the warm-up thread for good.
ERRORS = (OSError, ValueError, http.client.HTTPException)

# Loopback engines must never be reached through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(url: str, timeout_s: float, method: str = "GET", body: Any = None) -> tuple[int, bytes]:
    """(status, body); an HTTP error status is an answer, anything in ERRORS is raised."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    prepared = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        with _OPENER.open(prepared, timeout=timeout_s) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def timed_out(exc: BaseException) -> bool:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return isinstance(reason, TimeoutError)


def describe(exc: BaseException) -> str:
    """One line for the observed state: what a request in ERRORS ran into."""
    if isinstance(exc, urllib.error.URLError):
        exc = exc.reason if isinstance(exc.reason, BaseException) else exc
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (not listening yet)"
    if isinstance(exc, TimeoutError):
        return "probe timed out"
    return f"{type(exc).__name__}: {exc}"
