"""Instance records: written safely, read strictly, and not lost with the state dir."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from reconciler.act.records import Records
from reconciler.domain.facts import Record

RECORD = Record("gpt-oss", "0a1b2c3d", 1.0, leader_pid=42, leader_create_time=2.0, uid=0)


def test_round_trip_with_a_private_mode(tmp_path: Path) -> None:
    Records(tmp_path).write(RECORD)
    path = tmp_path / "instances" / "0a1b2c3d.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert Records(tmp_path).load() == (RECORD,)


def test_a_removed_state_dir_loses_no_record_of_a_running_reconciler(tmp_path: Path) -> None:
    records = Records(tmp_path)
    records.write(RECORD)
    shutil.rmtree(tmp_path / "instances")
    assert records.load() == (RECORD,)
    assert (tmp_path / "instances" / "0a1b2c3d.json").is_file(), "written again"
    records.remove(RECORD.instance)
    assert records.load() == ()


def test_junk_symlinks_fifos_and_bad_names_are_skipped(tmp_path: Path) -> None:
    folder = tmp_path / "instances"
    folder.mkdir()
    (folder / "deadbeef.json").write_text("{not json")
    (folder / "NOTANID.json").write_text("{}")
    os.symlink("/etc/passwd", folder / "cafebabe.json")
    os.mkfifo(folder / "feedface.json")
    (folder / "12345678.json").write_text('{"model": "x", "instance": "87654321", "started_at": 1}')
    assert Records(tmp_path).load() == ()
