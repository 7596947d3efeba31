"""Regression tests for the defects the fault suite (bench/chaos.py) found, one each."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from reconciler.domain import catalog, status
from reconciler.kit import schemas
from reconciler.kit.lock import StateLock
from reconciler.kit.logs import ActivityLog
from reconciler.kit.schemas import InvalidFile
from reconciler.observe.follow import Follower
from reconciler.store import state_file

SECRET = "root:$6$secrethash:19000:0:99999:7:::"


def _error(name: str, document: object) -> str:
    with pytest.raises(InvalidFile) as info:
        schemas.validate(name, document, "f.yaml")
    return str(info.value)


def test_a_whole_file_string_is_not_echoed_into_the_error() -> None:
    # desired_state.yaml symlinked to a file that YAML reads as one string
    message = _error("desired_state", "secret-content-" * 3)
    assert "secret-content" not in message and "45 characters" in message


def test_junk_keys_are_not_echoed_but_typos_are() -> None:
    # /etc/shadow read as YAML is a mapping whose key is the whole line
    assert "secrethash" not in _error("desired_state", {SECRET: None})
    assert "'modle'" in _error("desired_state", {"modle": "x"})


def test_error_messages_are_capped() -> None:
    message = _error("desired_state", {"model": "gpt-oss", "requested_by": "z" * 600_000})
    assert len(message) < 1000 and "zzz" not in message and "maxLength 200" in message


@pytest.mark.parametrize("value", [[{"api_key": "sk-live-123"}], 424242, {"k": "sk-live-123"}, 1.5e300, True])
def test_wrong_typed_values_are_never_echoed(value: object) -> None:
    """A desired file symlinked to a secret: the field and the expected type, never the value."""
    message = _error("desired_state", {"model": value})
    assert "sk-live" not in message and "424242" not in message and "1.5e" not in message, message
    assert "field 'model'" in message and "expected string or null" in message


def test_unknown_user_in_a_catalog_path_is_an_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "engines.yaml"
    path.write_text("state_dir: ~nosuchuser_chaos/run\nengines: {x: {command: [a], port: 1}}\n")
    with pytest.raises(InvalidFile, match="state_dir"):
        catalog.load_file(path, "--config")


def test_state_dir_is_not_world_writable_under_umask_000(tmp_path: Path) -> None:
    state = tmp_path / "run"
    old = os.umask(0)
    try:
        StateLock(state).acquire()  # the handle closes with the object
        state_file.write(state / "sub" / "observed_state.json",
                     status.Status(status.Phase.IDLE, "now", None, None, "idle"))
        log = ActivityLog(tmp_path / "nowhere" / "x" / "a.log", state, terminal=None)
        log.event("hello")
        log.close()
    finally:
        os.umask(old)
    for path in [state, *state.rglob("*"), tmp_path / "nowhere"]:
        assert not path.lstat().st_mode & stat.S_IWOTH, f"{path} {stat.filemode(path.lstat().st_mode)}"


def test_write_lines_is_one_line_each_with_one_prefix(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "a.log", tmp_path, terminal=None)
    log.write_lines("m", 7, ["one", "two", "three"])
    log.close()
    lines = (tmp_path / "a.log").read_text().splitlines()
    assert [x.split("] ", 3)[-1] for x in lines] == ["one", "two", "three"]
    assert all("] [m] [7] " in x for x in lines)


def test_the_loop_never_waits_behind_a_busy_follower(tmp_path: Path) -> None:
    log = ActivityLog(tmp_path / "a.log", tmp_path, terminal=None)
    follower = Follower(log, tmp_path)
    raw = tmp_path / "engines" / "m.abc.log"
    raw.parent.mkdir()
    raw.write_bytes(b"line\n")
    follower.track(raw, "m", 1)
    busy = threading.Thread(target=follower._poll_lock.acquire)  # the follower thread, mid-poll
    busy.start()
    busy.join()
    follower.poll(wait=False)  # returns at once; reads nothing
    assert follower.last_line(raw) is None
    follower._poll_lock.release()
    follower.poll(wait=False)
    assert follower.last_line(raw) == "line"
    log.close()


def test_a_removed_state_dir_lock_is_taken_again(tmp_path: Path) -> None:
    # chaos files: after `rm -rf` of the state dir a second reconciler could lock a new file
    import shutil

    lock = StateLock(tmp_path / "run")
    lock.acquire()
    assert lock.reassert() is False
    shutil.rmtree(tmp_path / "run")
    assert lock.reassert() is True
    from reconciler.kit.lock import AlreadyRunning
    with pytest.raises(AlreadyRunning):
        StateLock(tmp_path / "run").acquire()


def test_the_log_says_when_it_falls_back_mid_run_and_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # chaos files: the log path became a directory mid-run; the fallback was silent and permanent
    import io

    from reconciler.kit import logs
    monkeypatch.setattr(logs, "ROTATE_CHECK_S", 0.0)
    term = io.StringIO()
    log = ActivityLog(tmp_path / "a.log", tmp_path / "run", terminal=term)
    log.event("one")
    os.rename(tmp_path / "a.log", tmp_path / "a.log.1")
    (tmp_path / "a.log").mkdir()
    log.event("two")
    assert "falling back" in term.getvalue()
    assert "two" in (tmp_path / "run" / "ai_layer_activity.log").read_text()
    (tmp_path / "a.log").rmdir()
    log.event("three")
    assert "writable again" in term.getvalue()
    assert "three" in (tmp_path / "a.log").read_text()
    log.close()
