"""The activity log: neutralised text, one line format, tee to terminal and file, robust file."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest

from reconciler.kit import logs
from reconciler.kit.atomicfile import open_append
from reconciler.kit.logs import ActivityLog, format_line, sanitize

LINE = re.compile(
    r"^\[(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d)\] "
    r"\[(?P<model>[^\]]+)\] \[(?P<pid>\d+|-)\] (?P<message>.*)$"
)


def messages(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        match = LINE.match(line)
        assert match, f"badly formatted line: {line!r}"
        out.append(match["message"])
    return out


# --- sanitize ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"\x1b[31mred\x1b[0m plain", "red plain"),
        (b"\x1b[1;32;40mbold green\x1b[m", "bold green"),
        (b"\x1b[2K\x1b[1Gprogress 50%", "progress 50%"),
        (b"\x1b[?25lhidden cursor\x1b[?25h", "hidden cursor"),
        (b"\x1b[10A\x1b[3Bmoved", "moved"),
        (b"\x1b]0;window title\x07text", "text"),
        (b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", "link"),
        (b"\x1bMreverse index", "reverse index"),
    ],
)
def test_sanitize_removes_colour_and_cursor_escapes(raw: bytes, expected: str) -> None:
    assert sanitize(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"bell\x07", "bell\\x07"),
        (b"a\x00b", "a\\x00b"),
        (b"line\nforged", "line\\x0aforged"),
        (b"cr\rover", "cr\\x0dover"),
        (b"del\x7f", "del\\x7f"),
        ("c1\u0085\u009b".encode(), "c1\\x85\\x9b"),
        (b"lone esc \x1b", "lone esc \\x1b"),
    ],
)
def test_sanitize_makes_other_control_bytes_visible(raw: bytes, expected: str) -> None:
    assert sanitize(raw) == expected


def test_sanitize_turns_invalid_utf8_into_visible_escapes() -> None:
    assert sanitize(b"caf\xe9 \xff\xfe ok") == "caf\\xe9 \\xff\\xfe ok"
    assert sanitize("héllo ✓".encode()) == "héllo ✓"


def test_sanitize_keeps_tabs_and_accepts_str() -> None:
    assert sanitize(b"a\tb\tc") == "a\tb\tc"
    assert sanitize("x\ty\x1b[0m") == "x\ty"


def test_a_sanitized_line_cannot_forge_another_line() -> None:
    forged = b"ok\n[2026-01-01T00:00:00.000+00:00] [ailayer] [1] fake event"
    assert "\n" not in sanitize(forged)


# --- format_line ---------------------------------------------------------------------------


def test_format_line_shape() -> None:
    line = format_line("gpt-oss", 4242, "INFO loading weights")
    match = LINE.match(line)
    assert match is not None
    assert (match["model"], match["pid"], match["message"]) == ("gpt-oss", "4242", "INFO loading weights")


def test_format_line_without_pid() -> None:
    match = LINE.match(format_line("gemma2", None, "gone"))
    assert match is not None and match["pid"] == "-"


# --- ActivityLog ---------------------------------------------------------------------------


@pytest.fixture
def term() -> io.StringIO:
    return io.StringIO()


def test_every_line_goes_to_terminal_and_file(tmp_path: Path, term: io.StringIO) -> None:
    path = tmp_path / "log" / "activity.log"
    log = ActivityLog(path, tmp_path / "state", term)
    log.write("gpt-oss", 12, "first")
    log.event("second \x1b[31mevent\x1b[0m\n")
    log.close()
    on_terminal = term.getvalue()
    in_file = path.read_text(encoding="utf-8")
    assert on_terminal == in_file
    assert messages(in_file) == ["first", "second event\\x0a"]
    assert f"[ailayer] [{os.getpid()}]" in in_file.splitlines()[1]
    assert log.lost_lines == 0


def test_file_is_created_private_ish(tmp_path: Path) -> None:
    path = tmp_path / "activity.log"
    ActivityLog(path, tmp_path, None).close()
    assert path.stat().st_mode & 0o007 == 0


def test_appends_to_an_existing_file(tmp_path: Path, term: io.StringIO) -> None:
    path = tmp_path / "activity.log"
    path.write_text("older line\n", encoding="utf-8")
    log = ActivityLog(path, tmp_path, term)
    log.write("m", 1, "newer line")
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "older line"
    assert lines[1].endswith("newer line")


def test_no_terminal_still_writes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "activity.log"
    log = ActivityLog(path, tmp_path, None)
    log.write("m", 1, "quiet")
    log.close()
    assert messages(path.read_text(encoding="utf-8")) == ["quiet"]


def test_a_closed_terminal_does_not_stop_the_file(tmp_path: Path, term: io.StringIO) -> None:
    path = tmp_path / "activity.log"
    log = ActivityLog(path, tmp_path, term)
    term.close()
    log.write("m", 1, "after the terminal went away")
    log.close()
    assert messages(path.read_text(encoding="utf-8")) == ["after the terminal went away"]


def test_survives_logrotate(tmp_path: Path, term: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "ROTATE_CHECK_S", 0.0)
    path = tmp_path / "activity.log"
    log = ActivityLog(path, tmp_path / "state", term)
    log.write("m", 1, "before rotation")
    rotated = tmp_path / "activity.log.1"
    path.rename(rotated)
    log.write("m", 1, "after rotation 1")
    log.write("m", 1, "after rotation 2")
    log.close()
    assert messages(rotated.read_text(encoding="utf-8")) == ["before rotation"]
    assert messages(path.read_text(encoding="utf-8")) == ["after rotation 1", "after rotation 2"]
    assert log.path == path
    assert messages(term.getvalue()) == ["before rotation", "after rotation 1", "after rotation 2"]


def test_copytruncate_style_rotation_keeps_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "ROTATE_CHECK_S", 0.0)
    path = tmp_path / "activity.log"
    log = ActivityLog(path, tmp_path, None)
    log.write("m", 1, "one")
    os.truncate(path, 0)
    log.write("m", 1, "two")
    log.close()
    assert messages(path.read_text(encoding="utf-8")) == ["two"]


def test_falls_back_to_the_state_dir_and_says_so_once(tmp_path: Path, term: io.StringIO) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file\n", encoding="utf-8")
    state = tmp_path / "state"
    log = ActivityLog(blocker / "sub" / "activity.log", state, term)
    log.write("m", 1, "one")
    log.write("m", 1, "two")
    log.close()
    fallback = state / "ai_layer_activity.log"
    assert log.path == fallback
    assert messages(fallback.read_text(encoding="utf-8")) == ["one", "two"]
    said = [m for m in messages(term.getvalue()) if "falling back" in m]
    assert len(said) == 1
    assert str(blocker / "sub" / "activity.log") in said[0]
    assert str(fallback) in said[0]
    assert blocker.read_text(encoding="utf-8") == "a regular file\n"


def test_a_planted_symlink_is_not_followed(tmp_path: Path, term: io.StringIO) -> None:
    target = tmp_path / "etc-shadow"
    target.write_text("precious\n", encoding="utf-8")
    path = tmp_path / "activity.log"
    path.symlink_to(target)
    state = tmp_path / "state"
    log = ActivityLog(path, state, term)
    log.write("m", 1, "must not reach the target")
    log.close()
    assert target.read_text(encoding="utf-8") == "precious\n"
    assert path.is_symlink()
    assert log.path == state / "ai_layer_activity.log"
    assert messages(log.path.read_text(encoding="utf-8")) == ["must not reach the target"]
    assert any("falling back" in m for m in messages(term.getvalue()))


def test_symlink_planted_after_rotation_is_not_followed(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logs, "ROTATE_CHECK_S", 0.0)
    target = tmp_path / "victim"
    target.write_text("precious\n", encoding="utf-8")
    path = tmp_path / "activity.log"
    log = ActivityLog(path, tmp_path / "state", None)
    log.write("m", 1, "before")
    path.unlink()
    path.symlink_to(target)
    log.write("m", 1, "after")
    log.close()
    assert target.read_text(encoding="utf-8") == "precious\n"
    assert messages((tmp_path / "state" / "ai_layer_activity.log").read_text(encoding="utf-8")) == ["after"]


def test_nowhere_to_write_is_terminal_only_says_so_once_and_recovers(tmp_path: Path,
                                                                    term: io.StringIO) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    log = ActivityLog(blocker / "a.log", blocker / "state", term)
    for i in range(3):
        log.write("m", 1, f"lost {i}")
    said = messages(term.getvalue())
    assert sum("no writable log file" in m for m in said) == 1
    assert [m for m in said if m.startswith("lost")] == ["lost 0", "lost 1", "lost 2"]
    assert log.lost_lines == 3
    blocker.unlink()  # the folder can be created now
    log.write("m", 1, "back")
    log.close()
    assert messages((blocker / "a.log").read_text(encoding="utf-8")) == ["back"]
    assert any("writable again; 3 lines were lost" in m for m in messages(term.getvalue()))


def test_a_fifo_at_the_log_path_neither_blocks_nor_is_written(tmp_path: Path) -> None:
    """A FIFO there blocked open() and froze the loop (issue 11, item 8)."""
    fifo = tmp_path / "activity.log"
    os.mkfifo(fifo)
    log = ActivityLog(fifo, tmp_path / "state", terminal=None)
    log.event("hello")
    log.close()
    assert log.path == tmp_path / "state" / "ai_layer_activity.log"
    assert "hello" in log.path.read_text()


def test_another_users_file_and_a_symlinked_folder_are_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a file of another user")
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    planted = shared / "activity.log"
    planted.write_text("")
    os.chown(planted, 65534, 65534)
    with pytest.raises(OSError, match="owned by uid 65534"):
        open_append(planted)
    (tmp_path / "linked").symlink_to(tmp_path / "state", target_is_directory=True)
    (tmp_path / "state").mkdir()
    with pytest.raises(OSError):
        open_append(tmp_path / "linked" / "activity.log")


@pytest.mark.parametrize(("line", "ours"), [
    ('INFO:     127.0.0.1:32974 - "GET /health HTTP/1.1" 200 OK', True),  # vLLM (uvicorn)
    ('(APIServer pid=7) INFO:     127.0.0.1:1 - "GET /health HTTP/1.1" 200 OK', True),
    ('INFO:     ::1:5 - "GET /health?x=1 HTTP/1.1" 200 OK', True),
    ('[GIN] 2026/12/02 - 13:22:42 | 200 |       0.623ms |       127.0.0.1 | GET     "/api/ps"', True),
    ("srv  log_server_r: request: GET /health 127.0.0.1 200", True),  # llama.cpp, verbose
    ('INFO:     10.1.2.3:5 - "GET /health HTTP/1.1" 200 OK', False),  # another machine
    ('INFO:     127.0.0.1:5 - "GET /v1/models HTTP/1.1" 200 OK', False),  # another path
    ('[GIN] 2026/12/02 - 13:22:45 | 200 | 3208.571ms | 127.0.0.1 | POST    "/api/generate"', False),
    ("health check: GET /health is fine", False),
])
def test_is_probe_line(line: str, ours: bool) -> None:
    assert logs.is_probe_line(line, frozenset({"/health", "/api/ps"})) is ours


def test_log_level_drops_our_events_below_it(tmp_path: Path, term: io.StringIO) -> None:
    log = ActivityLog(tmp_path / "a.log", tmp_path, term, level="warning")
    log.event("a phase change")
    log.event("a problem", level="warning")
    log.event("a failure", level="error")
    log.write("gpt", 7, "engine output is always kept")
    log.close()
    text = (tmp_path / "a.log").read_text()
    assert "a phase change" not in text and "a problem" in text and "a failure" in text
    assert "engine output is always kept" in text
