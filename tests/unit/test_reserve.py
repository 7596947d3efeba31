"""Room kept for a file so it can be rewritten on a full disk (kit/atomicfile.py ``Reserve``),
and the state's marking while it is (publisher.py).

ENOSPC is played here by making the normal write (a new temp file) fail with it: the reserve
paths then only overwrite blocks that exist, which tests/integration/test_full_disk.py proves
on a real full tmpfs.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from reconciler.domain.status import Phase, Status
from reconciler.kit import atomicfile, schemas
from reconciler.kit.atomicfile import Reserve, padded
from reconciler.kit.logs import ActivityLog
from reconciler.publisher import Publisher
from reconciler.store import state_file

UNIT = 1024
DOC = json.dumps({"phase": "READY", "revision": 7})


@pytest.fixture
def full(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """No new file can be written (as on a full disk); returns the paths that were refused."""
    refused: list[Path] = []

    def no_room(path: Path, *args: Any, **kwargs: Any) -> None:
        refused.append(path)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomicfile, "write_atomic", no_room)
    return refused


def reserve(tmp_path: Path) -> Reserve:
    return Reserve(tmp_path / ".reserve", UNIT, 0o640)


def test_padding_keeps_the_document_and_prints_as_nothing() -> None:
    data = padded(DOC, UNIT)
    assert len(data) == UNIT
    assert json.loads(data) == json.loads(DOC)
    assert data == DOC.encode() + b"\n" + b"\r" * (UNIT - len(DOC) - 1)
    assert padded(DOC + "\n", len(DOC) + 1) == (DOC + "\n").encode()
    with pytest.raises(ValueError):
        padded(DOC, len(DOC))


def test_a_normal_write_pads_to_the_unit_and_keep_makes_the_spare(tmp_path: Path) -> None:
    r, path = reserve(tmp_path), tmp_path / "state.json"
    assert r.write(path, DOC) is None
    assert path.stat().st_size == UNIT and json.loads(path.read_bytes()) == json.loads(DOC)
    assert path.stat().st_mode & 0o777 == 0o640
    big = json.dumps({"phase": "x" * (2 * UNIT)})
    assert r.write(path, big) is None
    assert path.stat().st_size == 3 * UNIT
    assert not r.spare.exists()
    assert r.keep() and r.spare.stat().st_size == UNIT and r.spare.stat().st_mode & 0o777 == 0o640
    assert r.keep(), "kept, not rewritten"


def test_full_swaps_the_spare_in_and_the_old_file_becomes_the_spare(tmp_path: Path, full: list[Path]) -> None:
    r, path = reserve(tmp_path), tmp_path / "state.json"
    path.write_bytes(padded(DOC, UNIT))
    r.spare.write_bytes(padded(b"", UNIT))
    spare_inode = r.spare.stat().st_ino
    new = json.dumps({"phase": "LOADING", "revision": 8})
    with path.open("rb") as reader:  # a reader that opened the file before the write
        problem = r.write(path, new)
        assert json.loads(reader.read()) == json.loads(DOC), "sees the old file whole"
    assert problem is not None and problem.errno == errno.ENOSPC and full == [path]
    assert json.loads(path.read_bytes()) == json.loads(new)
    assert path.stat().st_ino == spare_inode, "swapped in, not copied"
    assert json.loads(r.spare.read_bytes()) == json.loads(DOC), "the old file waits as the spare"
    assert r.write(path, DOC) is not None and json.loads(path.read_bytes()) == json.loads(DOC)


def test_full_without_rename_exchange_overwrites_in_place(
        tmp_path: Path, full: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "not here", str(b))

    monkeypatch.setattr(atomicfile, "exchange", refused)
    r, path = reserve(tmp_path), tmp_path / "state.json"
    path.write_bytes(padded(DOC, 2 * UNIT))
    inode = path.stat().st_ino
    assert r.write(path, json.dumps({"phase": "IDLE"})) is not None
    assert path.stat().st_ino == inode and path.stat().st_size == 2 * UNIT
    assert json.loads(path.read_bytes()) == {"phase": "IDLE"}


def test_full_gives_a_new_file_the_spare_and_a_removed_file_becomes_the_next(
        tmp_path: Path, full: list[Path]) -> None:
    r = reserve(tmp_path)
    r.spare.write_bytes(padded(b"", UNIT))
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert r.write(first, DOC) is not None
    assert json.loads(first.read_bytes()) == json.loads(DOC) and not r.spare.exists()
    with pytest.raises(OSError) as no_spare:
        r.write(second, DOC)
    assert no_spare.value.errno == errno.ENOSPC and not second.exists()
    r.retire(first)
    assert not first.exists() and r.spare.stat().st_size == UNIT, "its room kept as the spare"
    assert r.write(second, DOC) is not None and json.loads(second.read_bytes()) == json.loads(DOC)


def test_retire_removes_when_a_spare_is_there_or_the_file_is_small(tmp_path: Path) -> None:
    r = reserve(tmp_path)
    small = tmp_path / "small.json"
    small.write_text(DOC)
    r.retire(small)
    assert not small.exists() and not r.spare.exists()
    r.keep()
    other = tmp_path / "other.json"
    other.write_bytes(padded(DOC, UNIT))
    r.retire(other)
    assert not other.exists() and r.spare.read_bytes() == padded(b"", UNIT), "the spare unchanged"


def test_full_says_so_when_the_room_is_too_small(tmp_path: Path, full: list[Path]) -> None:
    r, path = reserve(tmp_path), tmp_path / "state.json"
    path.write_bytes(padded(DOC, UNIT))
    r.spare.write_bytes(padded(b"", UNIT))
    with pytest.raises(OSError) as raised:
        r.write(path, json.dumps({"phase": "x" * UNIT}))
    assert raised.value.errno == errno.ENOSPC and "owns" in str(raised.value)
    assert json.loads(path.read_bytes()) == json.loads(DOC), "the last state is kept whole"


def test_other_errors_are_not_taken_for_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(path: Path, *args: Any, **kwargs: Any) -> None:
        raise PermissionError(errno.EACCES, "denied", str(path))

    monkeypatch.setattr(atomicfile, "write_atomic", denied)
    r, path = reserve(tmp_path), tmp_path / "state.json"
    r.spare.write_bytes(padded(b"", UNIT))
    with pytest.raises(PermissionError):
        r.write(path, DOC)
    assert r.spare.exists() and not path.exists()


def test_a_planted_link_is_never_written_through(tmp_path: Path, full: list[Path]) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"x" * UNIT)
    r, path = reserve(tmp_path), tmp_path / "state.json"
    os.symlink(victim, r.spare)
    os.symlink(victim, path)
    with pytest.raises(OSError):
        r.write(path, DOC)
    assert victim.read_bytes() == b"x" * UNIT


# --------------------------------------------------------------------------- the marking


def state(revision: int) -> Status:
    return Status(phase=Phase.READY, phase_since="2025-01-01T00:00:00+00:00", desired_model="m",
                  active_model="m", message="m is ready", revision=revision,
                  reconciler={"pid": 1, "heartbeat": "2025-01-01T00:00:00+00:00"})


def test_the_state_says_it_is_written_from_its_reserve_and_when_that_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "run" / "observed_state.json"
    assert state_file.write(path, state(3)) is None and state_file.keep_reserve(path)
    log = ActivityLog(tmp_path / "activity.log", tmp_path, terminal=None)
    publisher = Publisher(path, log)
    normal = atomicfile.write_atomic

    def no_room_for_the_state(target: Path, *args: Any, **kwargs: Any) -> None:
        if target == path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        normal(target, *args, **kwargs)

    publisher.kill_progress((123,), 1.0)  # the same message each time: only the marking moves
    assert state_file.read_raw(path)["revision"] == 4
    monkeypatch.setattr(atomicfile, "write_atomic", no_room_for_the_state)
    publisher.kill_progress((123,), 1.0)
    doc = state_file.read_raw(path)
    mark = doc["reconciler"]["state_write"]
    assert mark["error"] == "ENOSPC" and "room kept for it" in mark["message"]
    assert doc["revision"] == 5, "a watcher is woken"
    jsonschema.Draft202012Validator(schemas.load("observed_state")).validate(doc)
    publisher.kill_progress((123,), 1.0)
    again = state_file.read_raw(path)
    assert again["reconciler"]["state_write"] == mark and again["revision"] == 5

    monkeypatch.setattr(atomicfile, "write_atomic", normal)
    publisher.kill_progress((123,), 1.0)
    back = state_file.read_raw(path)
    assert "state_write" not in back["reconciler"] and back["revision"] == 6
    lines = (tmp_path / "activity.log").read_text().splitlines()
    assert sum("room kept for it" in line for line in lines) == 1
    assert sum("written normally again" in line for line in lines) == 1
