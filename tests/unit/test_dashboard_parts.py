"""The dashboard's server side without a browser: log-line parsing, the log tail, switch history."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from reconciler.gate import logtail
from reconciler.gate.logtail import LogTail
from reconciler.gate.statefollow import MISSING, snapshot_of
from reconciler.gate.switches import SwitchLog


def line(model: str, msg: str) -> str:
    return f"[2026-11-26T10:00:00.000+00:00] [{model}] [42] {msg}\n"


def test_parse_keeps_fields_and_odd_lines() -> None:
    assert logtail.parse(line("gemma2", 'msg="x [y]"').rstrip()) == {
        "ts": "2026-11-26T10:00:00.000+00:00", "model": "gemma2", "pid": 42, "msg": 'msg="x [y]"'}
    assert logtail.parse("no brackets here") == {"ts": None, "model": None, "pid": None, "msg": "no brackets here"}


def test_tail_gives_backlog_then_new_lines_filtered_and_survives_rotation(tmp_path: Path) -> None:
    log = tmp_path / "activity.log"
    log.write_text(line("ailayer", "old") + line("gemma2", "old g"))

    async def scenario() -> list[Any]:
        tail = LogTail((log,))
        watcher, backlog = tail.subscribe("gemma2")
        with log.open("a") as out:
            out.write(line("ailayer", "skip") + line("gemma2", "new") + "[2026-11-26T1")  # half a line
        first = await asyncio.wait_for(watcher.queue.get(), 5)
        with log.open("a") as out:
            out.write("0:00:00.000+00:00] [gemma2] [42] finished\n")
        second = await asyncio.wait_for(watcher.queue.get(), 5)
        os.rename(log, tmp_path / "activity.log.1")  # logrotate
        log.write_text(line("gemma2", "after rotation"))
        third = await asyncio.wait_for(watcher.queue.get(), 5)
        tail.unsubscribe(watcher)
        await tail.close()
        return [backlog, first, second, third]

    backlog, first, second, third = asyncio.run(scenario())
    assert [x["msg"] for x in backlog] == ["old g"]
    assert [x["msg"] for x in first] == ["new"]
    assert [x["msg"] for x in second] == ["finished"]
    assert [x["msg"] for x in third] == ["after rotation"]


def state(phase: str, desired: str | None, active: str | None, revision: int) -> Any:
    return snapshot_of({"phase": phase, "desired_model": desired, "active_model": active, "revision": revision})


def test_switches_end_when_the_wanted_model_is_ready_and_a_new_wish_supersedes() -> None:
    log = SwitchLog()
    steps = [state("IDLE", None, None, 1), state("LOADING", "a", None, 2), state("READY", "a", "a", 3),
             state("STOPPING", "b", "a", 4), state("LOADING", "c", None, 5), state("FAILED", "c", None, 6)]
    old = MISSING
    for new in steps:
        log.observe(old, new)
        old = new
    newest, middle, first = log.as_json()
    assert (first["from"], first["to"], first["outcome"]) == (None, "a", "done")
    assert first["duration_s"] is not None and first["duration_s"] >= 0
    assert (middle["to"], middle["outcome"]) == ("b", "superseded")
    assert (newest["to"], newest["outcome"], newest["duration_s"]) == ("c", "failed", None)
    assert "elapsed_s" in newest
