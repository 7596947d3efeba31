"""What the gate reads and changes in a request body, without parsing it where it can.

Its own module so that it can be compiled with the front door (docs/PERFORMANCE.md): the model
check runs on every proxied request.
"""

from __future__ import annotations

import json

from reconciler.gate.clients import Body

# Forever: only the reconciler unloads a model, by stopping its engine.
PINNED_KEEP_ALIVE = -1
_KEEP_ALIVE = "keep_alive"
# Encoded spellings remembered per (served name, field): one per catalog engine in practice.
SPELLINGS_MAX = 64
_SPELLINGS: dict[tuple[str, str], tuple[bytes, bytes, bytes]] = {}


def names_served(body: Body, served: str, field: str) -> bool:
    """Without parsing: does the body's only ``field`` key name the served model?

    Sound because a JSON string cannot contain ``"model"`` unescaped: if that byte
    sequence occurs once, it is the one key, and it is followed by the served name (or the
    key is nested and the top level names no model, which passes through anyway). Any
    other spelling (spaces, escapes, a second occurrence) falls back to a real parse.
    """
    key, tight, spaced = _spellings(served, field)
    if body.count(key) != 1:
        return False
    # find, not `in`: bytes.__contains__ first tries its argument as an int and formats (then
    # clears) a TypeError each time, a measurable part of a small request (3.11).
    return body.find(tight) >= 0 or body.find(spaced) >= 0


def _spellings(served: str, field: str) -> tuple[bytes, bytes, bytes]:
    """``"model"``, ``"model":"name"`` and ``"model": "name"``, encoded once per name."""
    spelt = _SPELLINGS.get((served, field))
    if spelt is None:
        if len(_SPELLINGS) >= SPELLINGS_MAX:
            _SPELLINGS.clear()
        key = f'"{field}"'.encode()
        name = json.dumps(served).encode()
        spelt = _SPELLINGS[served, field] = (key, key + b":" + name, key + b": " + name)
    return spelt


def pin_keep_alive(body: Body) -> Body:
    """``body`` with ``keep_alive`` set to -1, whatever the client asked.

    A client's keep_alive overrides the engine's OLLAMA_KEEP_ALIVE, so without this a
    ``keep_alive: 0`` would unload the model behind the reconciler's back, which would then
    report READY for an engine with nothing loaded. Replaced rather than removed: an adopted
    ``ollama serve`` may run with another OLLAMA_KEEP_ALIVE than the one the kind sets.

    Ollama decodes with Go's encoding/json, which matches keys case-insensitively (Unicode
    folding included) and after unescaping, so ``"KEEP_ALIVE"`` or ``"keep\u005falive"``
    would count too. A plain-ASCII body without escapes whose lowered bytes never spell the
    key has no such key: it gets one inserted without parsing. Anything else is parsed,
    every spelling of the key dropped and the pinned one set. Not a JSON object: unchanged
    (the engine answers its own 400).
    """
    if body.isascii() and body.find(b"\\u") < 0 and body.lower().find(_KEEP_ALIVE.encode()) < 0:
        head = body.lstrip()
        if not head.startswith(b"{"):
            return body
        rest = head[1:].lstrip()
        pinned = f'{{"{_KEEP_ALIVE}":{PINNED_KEEP_ALIVE}'.encode()
        return pinned + (b"" if rest.startswith(b"}") else b",") + rest
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict):
        return body
    kept = {k: v for k, v in doc.items() if k.casefold() != _KEEP_ALIVE}
    return json.dumps({**kept, _KEEP_ALIVE: PINNED_KEEP_ALIVE}, separators=(",", ":")).encode()
