"""Which Host names the gate answers to (DNS-rebinding defence), decided once per name.

A page on an attacker's domain that resolves to 127.0.0.1 must not reach the gate from a
browser on this machine: only loopback names, the configured listen host and
``gate.allowed_hosts`` (``*`` for any) are served; anything else gets 421.
"""

from __future__ import annotations

import ipaddress

from reconciler.domain.catalog import GateConfig

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})
# Answers remembered per Host value; a client sending endless distinct names only costs
# the check itself once the table is full.
MEMO_MAX = 256


def _loopback_ip(name: str) -> bool:
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


def name_of(host: str) -> str:
    """The Host header's name, lowered, without its port (an IPv6 literal keeps its brackets)."""
    host = host.lower()
    return host.rsplit(":", 1)[0] if not host.endswith("]") else host


class HostPolicy:
    """``allowed(host)`` for a Host header value (aiohttp's str or the front door's raw bytes),
    memoised."""

    def __init__(self, gate: GateConfig) -> None:
        self._allowed = LOOPBACK_NAMES | {gate.host.lower(), f"[{gate.host.lower()}]"} | set(gate.allowed_hosts)
        self._memo: dict[str | bytes, bool] = {}

    def allowed(self, host: str | bytes) -> bool:
        known = self._memo.get(host)
        if known is not None:
            return known
        name = name_of(host.decode("latin-1") if isinstance(host, bytes) else host)
        answer = "*" in self._allowed or name in self._allowed or _loopback_ip(name)
        if len(self._memo) < MEMO_MAX:
            self._memo[host] = answer
        return answer
