"""The killer on the fake clock, against real short-lived processes of its own (so the leak
check of tests/conftest.py applies).

A tree that keeps forking faster than the rounds allow must come back as *not* ok.
"""

from __future__ import annotations

import subprocess
import sys

import psutil
import pytest

from reconciler.act import killer
from reconciler.domain.facts import Proc

pytestmark = pytest.mark.usefixtures("fake_clock")


def _proc(popen: subprocess.Popen[bytes]) -> Proc:
    live = psutil.Process(popen.pid)
    return Proc(pid=popen.pid, ppid=live.ppid(), create_time=live.create_time(), cmdline="sleep")


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_forks_found_by_the_last_rescan_are_survivors_not_ok() -> None:
    started: list[subprocess.Popen[bytes]] = []

    def rescan() -> list[Proc]:
        fresh = _sleeper()  # the tree forks again every round
        started.append(fresh)
        return [_proc(fresh)]

    def reap() -> None:
        for child in started:
            child.poll()

    first = _sleeper()
    started.append(first)
    try:
        result = killer.cleanup_active_processes([_proc(first)], rescan, reap)
        assert not result.ok
        assert result.survivors == (started[-1].pid,)
    finally:
        for child in started:
            child.kill()
            child.wait()


def test_a_tree_that_dies_is_ok() -> None:
    child = _sleeper()

    def reap() -> None:
        child.poll()

    result = killer.cleanup_active_processes([_proc(child)], list, reap)
    child.wait()
    assert result.ok and result.killed == (child.pid,)
