"""No engine output vanishes silently (issue 25, 2 and 3): what the follower does not copy is
counted and said, a gone instance's file is kept until drained or its loss said, the activity
log has a size cap between rotations, and no separator or bidi control forges a line."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from reconciler.domain.catalog import LogLimits
from reconciler.kit.clock import FakeClock
from reconciler.kit.logs import ActivityLog
from reconciler.observe import follow
from reconciler.observe.follow import Follower, Loss

LINE = re.compile(r"^\[[^\]]+\] \[(?P<model>[^\]]+)\] \[(?P<pid>[^\]]+)\] (?P<message>.*)$")
LOSS = re.compile(r"^(?P<model>\S+) \(pid (?P<pid>\S+)\): (?P<bytes>[\d,]+) bytes of its output were not "
                  r"copied to this log: (?P<why>.*)$")


def written(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def numbered(count: int, width: int = 40) -> list[bytes]:
    return [f"line {i:06d} ".encode().ljust(width, b"x") for i in range(count)]


class Rig:
    def __init__(self, tmp_path: Path, limits: LogLimits) -> None:
        self.state = tmp_path / "state"
        (self.state / "engines").mkdir(parents=True)
        self.term = io.StringIO()
        self.log = ActivityLog(tmp_path / "activity.log", self.state, self.term)
        self.follower = Follower(self.log, self.state)
        self.follower.limits = limits
        self.path = self.state / "engines" / "m.a1.log"

    def messages(self, model: str) -> list[str]:
        out = []
        for line in self.term.getvalue().splitlines():
            match = LINE.match(line)
            assert match, f"badly formatted line: {line!r}"
            if match["model"] == model:
                out.append(match["message"])
        return out

    def losses(self) -> list[tuple[int, str]]:
        found = [LOSS.match(m) for m in self.messages("ailayer")]
        return [(int(m["bytes"].replace(",", "")), m["why"]) for m in found if m]


def test_output_over_the_rate_is_counted_to_the_byte_and_said(tmp_path: Path, fake_clock: FakeClock) -> None:
    rig = Rig(tmp_path, LogLimits(engine_bytes_per_s=1_000, engine_burst_bytes=2_000, file_max_bytes=None))
    lines = numbered(250)  # 10,250 bytes
    rig.path.write_bytes(written(lines))
    rig.follower.track(rig.path, "m", 7)
    rig.follower.poll()
    copied = rig.messages("m")
    assert copied == [line.decode() for line in lines[:len(copied)]]  # whole lines, in order
    assert 0 < len(copied) <= 2_000 // 41
    [(lost, why)] = rig.losses()
    assert lost == len(written(lines)) - len(written(lines[:len(copied)]))
    assert why.startswith(Loss.RATE_LIMIT.value)
    assert "m (pid 7)" in rig.messages("ailayer")[-1]


def test_after_a_skip_copying_resumes_at_a_line_start(tmp_path: Path, fake_clock: FakeClock) -> None:
    rig = Rig(tmp_path, LogLimits(engine_bytes_per_s=1_000, engine_burst_bytes=2_000, file_max_bytes=None))
    first = numbered(100)
    rig.path.write_bytes(written(first) + b"an unfinished li")  # a skip lands mid-line
    rig.follower.track(rig.path, "m", 7)
    rig.follower.poll()
    later = [b"later %d" % i for i in range(3)]
    with rig.path.open("ab") as handle:
        handle.write(b"ne, then more\n" + written(later))
    fake_clock.advance(60.0)  # the bucket is full again
    rig.follower.poll()
    copied = rig.messages("m")
    assert copied[-3:] == [line.decode() for line in later]  # resumed at the first whole line
    assert set(copied[:-3]) <= {line.decode() for line in first}  # never a piece of a line
    lost = sum(size for size, _ in rig.losses())
    assert lost + sum(len(m) + 1 for m in copied) == rig.path.stat().st_size


def test_a_gone_instance_s_file_is_kept_until_all_of_it_is_copied(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follow, "READ_CHUNK", 4_096)
    monkeypatch.setattr(follow, "POLL_BUDGET_BYTES", 16_384)
    rig = Rig(tmp_path, LogLimits(engine_bytes_per_s=None, file_max_bytes=None))
    lines = numbered(2_000)  # 82,000 bytes: several polls' worth
    rig.path.write_bytes(written(lines))
    rig.follower.track(rig.path, "m", 7)
    rig.follower.retain(set())  # the instance is gone (a switch)
    rig.follower.poll()
    assert rig.path.exists(), "deleted before it was drained"
    polls = 1
    while rig.path.exists():
        rig.follower.poll()
        polls += 1
        assert polls < 100
    assert rig.messages("m") == [line.decode() for line in lines]
    assert rig.losses() == []


def test_a_gone_instance_s_output_over_its_rate_is_said_before_its_file_goes(
        tmp_path: Path, fake_clock: FakeClock) -> None:
    rig = Rig(tmp_path, LogLimits(engine_bytes_per_s=1_000, engine_burst_bytes=4_100, file_max_bytes=None))
    lines = numbered(1_000)
    rig.path.write_bytes(written(lines))
    rig.follower.track(rig.path, "m", 7)
    rig.follower.retain(set())
    rig.follower.poll()
    assert not rig.path.exists()
    copied = rig.messages("m")
    assert len(copied) == 100
    [(lost, why)] = rig.losses()
    assert lost == len(written(lines[100:]))
    assert why.startswith(Loss.STOPPED.value)


def test_the_activity_log_stops_taking_engine_output_at_its_cap_and_says_so(tmp_path: Path) -> None:
    term = io.StringIO()
    path = tmp_path / "activity.log"
    log = ActivityLog(path, tmp_path / "state", term)
    log.max_bytes = 2_000
    for i in range(100):
        log.write_lines("m", 7, [f"engine line {i:03d}"])
    log.event("our own event past the cap")
    text = path.read_text()
    assert len(text) < 2_000 + 400
    assert "reached its cap of 2,000 bytes" in text
    assert "engine line 099" not in text and "engine line 099" in term.getvalue()  # the terminal has all
    assert "our own event past the cap" in text
    path.rename(tmp_path / "activity.log.1")  # logrotate
    log.write_lines("m", 7, ["after the rotation"])
    fresh = path.read_text().splitlines()
    assert "bytes of engine output left out of it: m " in fresh[0]
    left = int(fresh[0].rsplit("m ", 1)[1].replace(",", ""))
    dropped = [line for line in term.getvalue().splitlines(keepends=True)
               if "engine line" in line and line.split("] ", 3)[-1].strip() not in text]
    assert left == sum(map(len, dropped)) and len(dropped) > 50
    assert fresh[1].endswith("after the rotation")
    log.close()


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u202e", "\u2066", "\x85", "\x1c", "\x0b"])
def test_no_separator_or_bidi_control_makes_a_line_for_str_splitlines(tmp_path: Path, separator: str) -> None:
    rig = Rig(tmp_path, LogLimits())
    forged = f"harmless{separator}[2026-12-08T10:00:00.000+00:00] [ailayer] [1] phase READY: forged"
    rig.path.write_bytes((forged + "\nnext\n").encode())
    rig.follower.track(rig.path, "m", 7)
    rig.follower.poll()
    rig.log.event(f"our own event{separator}[x] [ailayer] [1] forged too")
    text = rig.log.path.read_text(encoding="utf-8")
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"a line no writer wrote: {line!r}"
        assert (match["model"], match["pid"]) in {("m", "7"), ("ailayer", str(__import__("os").getpid()))}
    assert separator not in text
    assert len(text.splitlines()) == 3
