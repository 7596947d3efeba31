"""Reading requests and writing responses the same way in both engines' APIs: JSON bodies,
JSON errors, streamed chunks, and the loose fields clients send."""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, Callable, Mapping
from typing import Any

from aiohttp import web

from reconciler.engines.demo.stats import Stats


async def stream_out(
    request: web.Request, stats: Stats, content_type: str, chunks: AsyncIterable[bytes]
) -> web.StreamResponse:
    """Write each chunk as soon as it exists (its own write, so its own TCP segment)."""
    resp = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
    with stats.track(streaming=True):
        await resp.prepare(request)
        async for chunk in chunks:
            await resp.write(chunk)
        await resp.write_eof()
    return resp


async def read_json(request: web.Request, bad: Callable[[str], web.HTTPException]) -> dict[str, Any]:
    """The request body as a JSON object, or the engine's own 400 error."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad(f"invalid JSON body: {exc}") from exc
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    return body


def json_error(status: int, payload: object) -> web.HTTPException:
    """An aiohttp HTTP exception carrying a JSON body, raisable from anywhere in a handler."""
    exc = web.HTTPException(text=json.dumps(payload), content_type="application/json")
    exc.set_status(status)
    return exc


def text_of(value: object) -> str:
    """Flatten a prompt, message content or input (str, list of parts, ...) to text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(v) for v in value)
    if isinstance(value, dict):
        return text_of(value.get("text", value.get("content", "")))
    return "" if value is None else str(value)


def int_field(body: Mapping[str, Any], *names: str, default: int) -> int:
    """The first of ``names`` present as a non-negative int, else ``default``."""
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default
