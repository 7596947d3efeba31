"""The rules both request paths keep: the front door (reconciler/gate/frontdoor.py) and the
aiohttp handlers (reconciler/gate/proxy.py) import them from here, so a request is judged
and ended the same way whichever path serves it (tests/e2e/test_request_rules.py runs one
table of requests through both).

What they share: which engine URL may receive a prompt (``trusted``), the model check (409,
or the catalog name mapped to the served name), Ollama's keep_alive pin, the headers that are
never relayed, the answer for an engine that failed (``upstream_refusal``), a switch ending the
requests in flight (``cancel_switched``), and how a request that already began its answer is
ended with an error (``ending``). Import-linter holds the direction: the front door never
imports the handlers' module.
"""

from __future__ import annotations

import enum
import json
import urllib.parse
from collections.abc import Iterable
from typing import Protocol

from reconciler.domain.catalog import Catalog
from reconciler.gate import errors, upstream
from reconciler.gate.admission import SELECT_HINT
from reconciler.gate.bodies import names_served
from reconciler.gate.clients import Body
from reconciler.gate.errors import OLLAMA, Code, Refusal
from reconciler.gate.statefollow import Snapshot, StateFollower, Target

# A request that met a dead pooled connection before any answer is sent once more.
SEND_ATTEMPTS = 2
# A non-streamed answer up to this size is read whole and sent in one piece (fewer writes);
# larger ones and all streams are relayed chunk by chunk.
WHOLE_BODY_MAX = 1 << 20
# Retry hint after an engine that should be READY refused the connection: the reconciler's
# liveness probe needs a few seconds to notice and restart it.
RETRY_ENGINE_DOWN_S = 5.0
# Retry-After when the state file routes to a URL the catalog does not name (planted, or
# written by another install): the reconciler rewrites the state within a resync.
UNTRUSTED_RETRY_S = 5.0

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})  # fmt: skip
# Expect: the gate has the whole body and sends it at once; an engine's 100 Continue is skipped.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "expect"}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}
STREAM_TYPES = ("text/event-stream", "application/x-ndjson")
# Ollama's routes whose request loads the model and sets how long it stays (keep_alive).
KEEP_ALIVE_ROUTES = frozenset({"/api/generate", "/api/chat", "/api/embed", "/api/embeddings"})


class Tracked(Protocol):
    """A proxied request and the engine it went to; ``refusal`` is set when it is aborted,
    then ``cancel`` ends it (with that refusal as its answer or last stream item)."""

    target: Target
    refusal: Refusal | None

    def cancel(self) -> object: ...


class Ending(enum.Enum):
    """How a request that failed is ended, by how far its answer got."""

    ANSWER = "answer"  # nothing sent yet: the error is the whole answer
    STREAM_ITEM = "stream item"  # a stream began: its last item says what happened
    CUT = "cut"  # a fixed-length body or an unknown format cannot carry an error


def ending(refusal: Refusal, began: bool, ctype: str, can_carry: bool = True) -> tuple[Ending, bytes | None]:
    """What to send: an error answer, an error item in the stream, or nothing and a cut
    connection, so the client sees a truncated response, never a plausible one."""
    if not began:
        return Ending.ANSWER, None
    chunk = errors.stream_error_chunk(refusal, ctype) if can_carry else None
    return (Ending.STREAM_ITEM, chunk) if chunk is not None else (Ending.CUT, None)


def switch_refusal(old: Target, new: Snapshot) -> Refusal:
    data = new.data or {}
    now = new.target.model if new.target else data.get("desired_model")
    message = (
        f"request ended by the gate: model {old.model!r} stopped being served "
        f"(phase now {new.phase or 'unknown'}, desired model {data.get('desired_model')!r}); "
        "the gate never finishes a request on an engine that is being switched away"
    )
    detail = {"phase": new.phase, "previous_model": old.model, "model": now,
              "revision": new.revision}
    return Refusal(503, Code.MODEL_SWITCHED, message, None, detail)


def cancel_switched(flights: Iterable[Tracked], new: Snapshot) -> None:
    """A new valid state that no longer routes to a request's engine ends that request."""
    if new.data is None:
        return  # the file vanished: we know nothing new about the engine, keep going
    for flight in list(flights):
        if flight.target != new.target and flight.refusal is None:
            flight.refusal = switch_refusal(flight.target, new)
            flight.cancel()


def engine_failed(exc: BaseException, flight: Tracked, flights: set[Tracked], follower: StateFollower) -> Refusal:
    """The answer for a request whose engine failed it. The reconciler writes STOPPING before
    it kills an engine, but the gate reads that a few milliseconds later: an engine that died
    in between looked like a broken engine (502) to 11 of 20 requests in flight across a
    switch. So the state file is read again now; if it no longer routes to this request's
    engine, the failure was the switch, and the request ends with the switch's error."""
    flights.discard(flight)  # judged here, not cancelled by the re-read's listeners
    follower.reload()
    new = follower.snapshot
    if new.data is not None and new.target != flight.target:
        return switch_refusal(flight.target, new)
    return upstream_refusal(exc, flight.target)


def upstream_refusal(exc: BaseException, target: Target) -> Refusal:
    """The answer for a request whose engine failed it: timed out, unreachable, or broke off."""
    detail = {"engine_url": target.url, "model": target.model, "error": repr(exc)}
    if isinstance(exc, TimeoutError | upstream.ReadTimeout):
        return Refusal(504, Code.ENGINE_TIMEOUT,
                       f"engine for {target.model!r} at {target.url} went silent: {exc!r}",
                       None, detail)
    if isinstance(exc, upstream.ConnectFailed):
        return Refusal(502, Code.ENGINE_UNREACHABLE,
                       f"engine for {target.model!r} at {target.url} refused the connection"
                       " (the reconciler restarts it if it died)",
                       RETRY_ENGINE_DOWN_S, detail)
    return Refusal(502, Code.ENGINE_ERROR,
                   f"engine for {target.model!r} at {target.url} broke off: {exc!r}",
                   RETRY_ENGINE_DOWN_S, detail)


class Rules:
    """The catalog's side of the rules: which engines exist, under which names."""

    def __init__(self, catalog: Catalog) -> None:
        self._addresses: dict[str, tuple[str, int]] = {}  # engine base URL -> (host, port)
        self.use(catalog)

    def use(self, catalog: Catalog) -> None:
        """Judge by this catalog from now on (the file changed)."""
        self._catalog = catalog
        self.known = catalog.names()  # a new list when the catalog changes (caches compare identity)
        self._by_served = {e.served_name: name for name, e in catalog.engines.items()}
        self._ollama = frozenset(name for name, e in catalog.engines.items() if e.kind == "ollama")

    def pins_keep_alive(self, route: str, target: Target) -> bool:
        """Whether this request's body gets ``keep_alive`` pinned (see ``bodies.pin_keep_alive``)."""
        return route in KEEP_ALIVE_ROUTES and self.ollama(target)

    def ollama(self, target: Target) -> bool:
        return target.model in self._ollama

    def address(self, target: Target) -> tuple[str, int]:
        """(host, port) of an engine URL, parsed once per URL."""
        address = self._addresses.get(target.url)
        if address is None:
            parts = urllib.parse.urlsplit(target.url)
            address = self._addresses[target.url] = (parts.hostname or "127.0.0.1", parts.port or 80)
        return address

    def trusted(self, target: Target) -> Target | Refusal:
        """Proxy only to an engine URL the catalog names: the state file says where prompts
        (and clients' Authorization headers) go, and a planted one must not send them elsewhere."""
        engine = self._catalog.engines.get(target.model)
        if engine is not None and target.url == engine.base_url:
            return target
        return Refusal(503, Code.UNTRUSTED_STATE,
                       f"the observed state routes {target.model!r} to {target.url[:200]}, which the "
                       "catalog does not name; not proxying", UNTRUSTED_RETRY_S,
                       {"model": target.model})

    def check_model(self, body: Body, target: Target, family: str, field: str) -> Body | Refusal:
        """Refuse another model by name (409); map the catalog name to the served name."""
        if names_served(body, target.served_name, field):
            return body
        try:
            doc = json.loads(body)
        except ValueError:
            return body  # not JSON: the engine gives its own error
        if not isinstance(doc, dict):
            return body
        name = doc.get(field)
        if not isinstance(name, str) or not name or name == target.served_name:
            return body
        if name == target.model:
            doc[field] = target.served_name
            return json.dumps(doc, separators=(",", ":")).encode()
        if family == OLLAMA and ":" not in name and target.served_name == name + ":latest":
            return body
        return self._mismatch(name, target)

    def _mismatch(self, name: str, target: Target) -> Refusal:
        catalog_name = name if name in self._catalog.engines else self._by_served.get(name)
        served = "" if target.served_name == target.model else f" (served as {target.served_name!r})"
        message = (
            f"model {name!r} is not the active model; the active model is {target.model!r}"
            f"{served}. The gate never switches models by itself: "
        )
        if catalog_name:
            message += (f"run `ailayer toggle {catalog_name}` or POST /toggle "
                        f'{{"model": "{catalog_name}"}} to switch')
        else:
            message += f"{name!r} is not in the catalog either (known: {', '.join(self.known)})"
        detail = {"requested_model": name, "active_model": target.model,
                  "served_name": target.served_name, "known_models": self.known,
                  "how_to_select": SELECT_HINT}
        return Refusal(409, Code.MODEL_NOT_ACTIVE, message, None, detail,
                       {"X-AILayer-Active-Model": target.model})
