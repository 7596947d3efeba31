"""Error answers in the envelope each client family parses.

OpenAI clients read ``{"error": {"message", "type", "code", "param"}}``; the ``ollama``
client reads ``{"error": "text"}``. Both get the same machine-readable detail beside it
under ``"ailayer"`` (phase, model, elapsed time, deadline, how to fix it), so a UI can
show "Loading gpt-oss, 12 of 45 minutes" without a second request.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from enum import StrEnum
from http import HTTPStatus
from typing import Any

from aiohttp import web

from reconciler.kit import clock

OPENAI = "openai"
OLLAMA = "ollama"

STALE_HEADER = "X-AILayer-State-Stale"
PHASE_HEADER = "X-AILayer-Phase"
# The observed state's revision: the one counter GET /status?since= compares.
REVISION_HEADER = "X-AILayer-Revision"
NO_BUFFERING = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_SPLICE = re.compile(r"[\r\n]")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    428: "invalid_request_error",
    431: "invalid_request_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class Code(StrEnum):
    """The gate's own answers, defined once: the ``code`` (and ``ailayer.reason``) of its error
    bodies, and the ``outcome`` label of ``ailayer_gate_requests``. Clients and dashboards
    match on these strings."""

    BAD_PATH = "bad_path"
    BAD_QUERY = "bad_query"
    BAD_REQUEST = "bad_request"
    BODY_TIMEOUT = "body_timeout"
    BODY_TOO_LARGE = "body_too_large"
    GATE_BUSY = "gate_busy"
    HEAD_TOO_LARGE = "head_too_large"
    HOST_NOT_ALLOWED = "host_not_allowed"
    MODEL_FAILED = "model_failed"
    MODEL_LOADING = "model_loading"
    NO_MODEL_SELECTED = "no_model_selected"
    RECONCILER_NOT_RUNNING = "reconciler_not_running"
    TOGGLE_DISABLED = "toggle_disabled"
    UNAUTHORIZED = "unauthorized"
    TOO_MANY_TOKEN_FAILURES = "too_many_token_failures"  # noqa: S105 (a code, not a password)
    UNKNOWN_MODEL = "unknown_model"
    WRITE_FAILED = "write_failed"
    ENGINE_ERROR = "engine_error"
    ENGINE_TIMEOUT = "engine_timeout"
    ENGINE_UNREACHABLE = "engine_unreachable"
    MODEL_NOT_ACTIVE = "model_not_active"
    MODEL_SWITCHED = "model_switched"
    UNTRUSTED_STATE = "untrusted_state"
    # Outcomes that are not refusals.
    PROXIED = "proxied"
    CLIENT_GONE = "client_gone"
    OK = "ok"
    ACCEPTED = "accepted"
    COMPLETED = "completed"


@dataclass(frozen=True)
class Refusal:
    """Why the gate answers itself instead of the engine: status, reason code, message."""

    status: int
    code: Code
    message: str
    retry_after_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


def family_of(path: str) -> str:
    """Ollama's native API lives under /api/; everything else speaks OpenAI."""
    return OLLAMA if path.startswith("/api/") else OPENAI


def retry_after_header(seconds: float) -> str:
    """Whole wall-clock seconds, at least 1 (a scaled clock still needs a real pause)."""
    return str(max(1, math.ceil(clock.real_seconds(seconds))))


def body_of(refusal: Refusal, family: str) -> dict[str, Any]:
    detail = {"reason": refusal.code, **refusal.detail}
    if refusal.retry_after_s is not None:
        detail["retry_after_s"] = refusal.retry_after_s
    if family == OLLAMA:
        return {"error": refusal.message, "ailayer": detail}
    error = {
        "message": refusal.message,
        "type": _TYPES.get(refusal.status, "error"),
        "code": refusal.code,
        "param": "model" if refusal.status == 409 else None,
    }
    return {"error": error, "ailayer": detail}


def _headers(refusal: Refusal, stale: bool | None) -> dict[str, str]:
    """A refusal's own headers; every 503 carries Retry-After."""
    headers = dict(refusal.headers)
    retry = refusal.retry_after_s
    if retry is None and refusal.status == 503:
        retry = 1.0
    if retry is not None:
        headers["Retry-After"] = retry_after_header(retry)
    if stale is not None:
        headers[STALE_HEADER] = "true" if stale else "false"
    return headers


def _text(refusal: Refusal, family: str) -> str:
    return json.dumps(body_of(refusal, family), separators=(",", ":"))


def respond(refusal: Refusal, family: str, *, stale: bool | None = None) -> web.Response:
    """The HTTP answer for a refusal, for an aiohttp handler."""
    return web.Response(status=refusal.status, text=_text(refusal, family), content_type="application/json",
                        headers=_headers(refusal, stale))


def render(refusal: Refusal, family: str, *, stale: bool | None, date: str, close: bool) -> bytes:
    """The same answer as ``respond``, as the bytes of a whole HTTP/1.1 response (the front
    door's, reconciler/gate/frontdoor.py). Header values are ours or the catalog's: one with a
    CR or LF is dropped rather than spliced."""
    body = _text(refusal, family).encode()
    lines = [f"HTTP/1.1 {refusal.status} {HTTPStatus(refusal.status).phrase}",
             "Content-Type: application/json; charset=utf-8", f"Content-Length: {len(body)}", f"Date: {date}"]
    lines += [f"{k}: {v}" for k, v in _headers(refusal, stale).items() if not _SPLICE.search(k + v)]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body


def stream_error_chunk(refusal: Refusal, content_type: str) -> bytes | None:
    """The error as one more item of an already started stream, or None if the format
    has no way to say it (then the connection is cut so the client sees a truncation)."""
    if content_type.startswith("text/event-stream"):
        payload = json.dumps(body_of(refusal, OPENAI), separators=(",", ":"))
        return f"data: {payload}\n\n".encode()
    if content_type.startswith(("application/x-ndjson", "application/jsonl")):
        payload = json.dumps(body_of(refusal, OLLAMA), separators=(",", ":"))
        return f"{payload}\n".encode()
    return None
