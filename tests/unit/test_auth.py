"""reconciler/gate/auth.py: who may see engine output or toggle, and the limit on wrong tokens.

Issue 25, item 6: 1,000 wrong tokens were answered 401 at ~1,049 a second. Now an address
gets ``gate.token_failures_per_minute`` of them a minute, then 429 until its minute ends,
whatever it sends; and the token is compared on every try, so a limited answer costs what a
wrong one does and never tells a right guess from a wrong one. Time is a plain counter here.
"""

from __future__ import annotations

import hmac
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reconciler.domain import catalog, status
from reconciler.domain.catalog import GateConfig
from reconciler.gate import auth
from reconciler.gate.auth import FAILURE_WINDOW_S, Access, FailureLimiter, Guard, client_key
from reconciler.kit.schemas import InvalidFile
from reconciler.store import state_file

TOKEN = "unit-test-token-0123456789"
RIGHT = f"Bearer {TOKEN}"
WRONG = "Bearer not-the-token"
HERE, THERE = "192.0.2.7", "192.0.2.8"
LIMIT = 4


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def guard(limit: int = LIMIT) -> tuple[Guard, Clock]:
    now = Clock()
    return Guard(GateConfig(token=TOKEN, token_failures_per_minute=limit), now), now


def test_no_token_configured_is_open_and_no_header_is_anonymous() -> None:
    assert Guard(GateConfig(token=None)).check(RIGHT, HERE).access is Access.OPEN
    g, _ = guard()
    assert g.check(None, HERE).access is Access.ANONYMOUS
    assert g.check(RIGHT, HERE).access is Access.GRANTED
    assert g.check(f"bearer  {TOKEN} ", HERE).access is Access.GRANTED
    assert g.check(WRONG, HERE).access is Access.DENIED
    assert g.check(f"Basic {TOKEN}", HERE).access is Access.DENIED, "another scheme is a wrong token"


def test_after_the_limit_an_address_is_refused_even_the_right_token_until_its_minute_ends() -> None:
    g, now = guard()
    assert [g.check(WRONG, HERE).access for _ in range(LIMIT)] == [Access.DENIED] * LIMIT
    now.t += 10.0
    limited = g.check(WRONG, HERE)
    assert limited.access is Access.LIMITED and limited.retry_after_s == pytest.approx(FAILURE_WINDOW_S - 10.0)
    right = g.check(RIGHT, HERE)
    assert right == limited, "the right token is answered exactly as a wrong one while limited"
    assert g.check(RIGHT, THERE).access is Access.GRANTED, "another address is counted apart"
    assert g.check(None, HERE).access is Access.ANONYMOUS, "token-free reads are not limited"
    now.t += FAILURE_WINDOW_S - 10.0
    assert g.check(RIGHT, HERE).access is Access.GRANTED
    assert g.check(WRONG, HERE).access is Access.DENIED, "a new window"


def test_limited_tries_do_not_extend_the_window() -> None:
    g, now = guard()
    for _ in range(LIMIT):
        g.check(WRONG, HERE)
    for _ in range(100):
        now.t += 0.5
        assert g.check(WRONG, HERE).access is Access.LIMITED
    now.t = 1000.0 + FAILURE_WINDOW_S
    assert g.check(RIGHT, HERE).access is Access.GRANTED


@pytest.mark.parametrize("header", [RIGHT, WRONG, "Basic x"])
def test_the_token_is_compared_on_every_try_limited_or_not(monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        calls.append(1)
        return compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    g, _ = guard()
    g.check(header, HERE)
    for _ in range(LIMIT):
        g.check(WRONG, HERE)
    before = len(calls)
    assert g.check(header, HERE).access is Access.LIMITED
    assert len(calls) == before + 1, "a limited try still runs the compare"
    assert len(calls) == LIMIT + 2


def test_ipv6_is_counted_per_64_and_ipv4_mapped_as_ipv4() -> None:
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == HERE
    assert client_key(None) == "unknown"
    g, _ = guard(limit=1)
    g.check(WRONG, "2001:db8:1:2::1")
    assert g.check(RIGHT, "2001:db8:1:2::abcd").access is Access.LIMITED


def test_the_table_of_addresses_is_bounded() -> None:
    now = Clock()
    limiter = FailureLimiter(LIMIT, now, cap=100)
    for i in range(5000):
        limiter.fail(f"10.0.{i // 256}.{i % 256}", now())
    assert len(limiter) == 100
    now.t += FAILURE_WINDOW_S
    limiter.fail("192.0.2.1", now())
    assert len(limiter) == 1, "ended windows are dropped"


def test_a_catalog_reload_keeps_the_count_and_takes_the_new_token() -> None:
    g, _ = guard()
    for _ in range(LIMIT):
        g.check(WRONG, HERE)
    g.use(GateConfig(token="another-token-0123456789", token_failures_per_minute=LIMIT))
    assert g.check("Bearer another-token-0123456789", HERE).access is Access.LIMITED
    assert g.check("Bearer another-token-0123456789", THERE).access is Access.GRANTED
    assert g.check(RIGHT, THERE).access is Access.DENIED


def test_refusals_are_401_and_429_with_retry_after() -> None:
    denied = auth.refusal(auth.Decision(Access.DENIED), "GET /logs")
    assert denied is not None and denied.status == 401 and "wrong token" in denied.message
    anonymous = auth.refusal(auth.Decision(Access.ANONYMOUS), "GET /logs")
    assert anonymous is not None and anonymous.status == 401 and "Bearer" in anonymous.message
    limited = auth.refusal(auth.Decision(Access.LIMITED, 12.5), "GET /logs")
    assert limited is not None and limited.status == 429 and limited.retry_after_s == 12.5
    assert auth.refusal(auth.Decision(Access.GRANTED), "x") is None
    assert auth.refusal(auth.Decision(Access.OPEN), "x") is None


# --------------------------------------------------------------------------- the catalog field


def test_the_limit_is_a_catalog_field_with_a_named_default() -> None:
    doc: dict[str, Any] = {"engines": {"m": {"command": ["/bin/engine"], "port": 9000}}}
    assert catalog.from_document(doc, "test", Path("/srv")).gate.token_failures_per_minute == \
        catalog.DEFAULT_TOKEN_FAILURES_PER_MINUTE == 10  # tests/e2e/test_token_reads.py LIMIT
    set_ = catalog.from_document({**doc, "gate": {"token_failures_per_minute": 3}}, "test", Path("/srv"))
    assert set_.gate.token_failures_per_minute == 3
    with pytest.raises(InvalidFile):
        catalog.from_document({**doc, "gate": {"token_failures_per_minute": 0}}, "test", Path("/srv"))


# --------------------------------------------------------------------------- item 5: the file


def test_the_observed_state_file_is_written_0640(tmp_path: Path) -> None:
    """It holds last_log_line (engine output) and was 0644."""
    path = tmp_path / "observed_state.json"
    doc = status.Status(phase=status.Phase.IDLE, phase_since="2026-01-01T00:00:00.000+00:00",
                        desired_model=None, active_model=None, message="", revision=1,
                        last_log_line="a prompt")
    state_file.write(path, doc)
    state_file.write(path, replace(doc, revision=2))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
