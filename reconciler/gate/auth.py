"""The one place that decides whether a request may see or change what needs the token.

``POST /toggle`` starts and kills processes; ``/logs``, the log lines in ``/events`` and
``last_log_line`` in ``/status`` carry engine output, which can hold a prompt. All of them
ask ``Guard.check`` and get an ``Access``: open (no token configured), granted, anonymous (no
``Authorization`` header: the reads answer what holds no engine output), denied (a wrong
token), or limited.

Wrong tokens are limited per client address: after ``gate.token_failures_per_minute`` of them
within ``FAILURE_WINDOW_S`` of the first, the address gets 429 with ``Retry-After`` until that
window ends, *whatever it sends*, the right token included: were the right token let through,
the 429 would tell an attacker that the guess it refused was wrong, and the one it let through
right. For the same reason the token is compared, in constant time, on every try, limited or
not, and the limit is decided before the compare and never from its result: a limited answer
costs what a wrong one does and says nothing about the guess. Both sides are hashed first, so
the compare also hides the token's length.

The limit is per address, and per gate worker process (``gate.workers``: each keeps its own
table, so W workers allow up to W times the limit). IPv6 clients are counted per /64, the
block one host is usually given. Behind a reverse proxy every client has the proxy's address:
one attacker there can lock everyone out of the token for a minute (the token-free reads keep
working); rate-limit at the proxy too (nginx: limit_req).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from reconciler.domain.catalog import GateConfig
from reconciler.gate.errors import Code, Refusal
from reconciler.kit import clock

# Failures are counted in windows this long from an address's first failure ("N a minute").
FAILURE_WINDOW_S = 60.0
# Addresses tracked at once: bounds the table (about 150 bytes each) against a flood from
# many addresses. When full, the address whose window started first is forgotten first.
MAX_TRACKED_ADDRESSES = 10_000
# IPv6 clients are counted per network of this size: one host usually holds a whole /64.
IPV6_PREFIX = 64

BEARER_HINT = "Authorization: Bearer TOKEN"


class Access(StrEnum):
    OPEN = "open"            # no token configured: nothing is guarded (toggling is off)
    GRANTED = "granted"      # the right token
    ANONYMOUS = "anonymous"  # no Authorization header: reads leave engine output out
    DENIED = "denied"        # a wrong token (counted against the address)
    LIMITED = "limited"      # too many wrong tokens from this address: refused, right or wrong


@dataclass(frozen=True)
class Decision:
    access: Access
    retry_after_s: float | None = None  # LIMITED: until the address's window ends

    @property
    def may_read(self) -> bool:
        """Engine output may be shown."""
        return self.access in (Access.OPEN, Access.GRANTED)


def client_key(remote: str | None) -> str:
    """Who is counted: the IPv4 address (also when IPv4-mapped), or the IPv6 /64."""
    if not remote:
        return "unknown"
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote  # a Unix socket or another transport: its own name
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


class FailureLimiter:
    """Wrong tokens per address in fixed windows: at most ``limit`` answered 401 per window."""

    def __init__(self, limit: int, now: Callable[[], float], cap: int = MAX_TRACKED_ADDRESSES) -> None:
        self.limit = limit
        self._now = now
        self._cap = cap
        # key -> (window start, failures in it); ordered by window start, oldest first.
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def now(self) -> float:
        return self._now()

    def retry_after(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may try again, or None while it is under the limit."""
        window = self._windows.get(key)
        if window is None:
            return None
        start, failures = window
        left = start + FAILURE_WINDOW_S - now
        return left if failures >= self.limit and left > 0 else None

    def fail(self, key: str, now: float) -> None:
        window = self._windows.get(key)
        if window is None or now - window[0] >= FAILURE_WINDOW_S:
            self._windows[key] = (now, 1)
            self._windows.move_to_end(key)
        else:
            self._windows[key] = (window[0], window[1] + 1)
        self._prune(now)

    def _prune(self, now: float) -> None:
        """Drop ended windows (they sit at the front), then the oldest while over the cap."""
        windows = self._windows
        while windows:
            key, (start, _) = next(iter(windows.items()))
            if now - start < FAILURE_WINDOW_S and len(windows) <= self._cap:
                break
            del windows[key]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


class Guard:
    """The token check and the limiter, shared by /toggle and the reads of engine output."""

    def __init__(self, gate: GateConfig, now: Callable[[], float] = clock.monotonic) -> None:
        self._limiter = FailureLimiter(gate.token_failures_per_minute, now)
        self.use(gate)

    def use(self, gate: GateConfig) -> None:
        """The catalog changed: a new token or limit; the failures counted so far stay."""
        self._digest = _digest(gate.token) if gate.token else None
        self._limiter.limit = gate.token_failures_per_minute

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None, remote: str | None) -> Decision:
        if self._digest is None:
            return Decision(Access.OPEN)
        if authorization is None:
            return Decision(Access.ANONYMOUS)
        key = client_key(remote)
        now = self._limiter.now()
        wait = self._limiter.retry_after(key, now)  # decided before, and apart from, the compare
        scheme, _, given = authorization.partition(" ")
        right = hmac.compare_digest(_digest(given.strip()), self._digest)  # on every try
        if wait is not None:
            # Counted like a wrong token, right or not (it moves nothing: the window stays), so
            # a limited answer does the very work of a wrong one and never looks at the guess.
            self._limiter.fail(key, now)
            return Decision(Access.LIMITED, wait)
        if right and scheme.lower() == "bearer":
            return Decision(Access.GRANTED)
        self._limiter.fail(key, now)
        return Decision(Access.DENIED)


def refusal(decision: Decision, what: str) -> Refusal | None:
    """The answer when ``what`` (a route) may not be shown: 401 without the right token, 429
    when limited; None when it may."""
    if decision.access in (Access.DENIED, Access.ANONYMOUS):
        wrong = "wrong token: " if decision.access is Access.DENIED else ""
        return Refusal(401, Code.UNAUTHORIZED, f"{wrong}{what} needs '{BEARER_HINT}'",
                       headers={"WWW-Authenticate": 'Bearer realm="ailayer"'})
    if decision.access is Access.LIMITED:
        return Refusal(429, Code.TOO_MANY_TOKEN_FAILURES,
                       "too many wrong tokens from this address; try again after Retry-After seconds",
                       retry_after_s=decision.retry_after_s)
    return None
