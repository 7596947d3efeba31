"""Instance records: what the executor wrote down about each engine it started.

One JSON file per instance in ``<state_dir>/instances/``. A record is who the instance is
after a reconciler restart (never "the newest cookie"): its leader by pid and create time,
its uid, the clock-seam start of its boot budget, and its cgroup in cgroup mode. The
state dir is root's and not writable by others, so nobody else can plant one.

A full filesystem must not stop a switch: each record is padded to a reserve unit, and a
spare of one unit waits in the folder (``.reserve``), renamed into place for a new record,
rewritten in place for a known one, and made again from a removed record or when there is
room (reconciler/kit/atomicfile.py, ``Reserve``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import asdict
from pathlib import Path

from reconciler.domain.facts import Record
from reconciler.kit.atomicfile import Reserve, ensure_dir

RECORD_MODE = 0o600
# A record is about 300 bytes; one filesystem block holds it with room to grow.
RECORD_RESERVE_BYTES = 4096
_INSTANCE_ID = re.compile(r"[0-9a-f]{8}")


class Records:
    """The files, backed by what this process wrote: a state dir removed under a running
    reconciler loses no instance (the records are written again on the next load)."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = state_dir / "instances"
        self._reserve = Reserve(self.folder / ".reserve", RECORD_RESERVE_BYTES, RECORD_MODE)
        self._written: dict[str, Record] = {}

    def _path(self, instance: str) -> Path:
        if not _INSTANCE_ID.fullmatch(instance):
            raise ValueError(f"not an instance id: {instance!r}")
        return self.folder / f"{instance}.json"

    def write(self, record: Record) -> None:
        self._written[record.instance] = record
        ensure_dir(self.folder)
        # Not fsync'd: a record must outlive the reconciler (the page cache does), and after
        # a power loss its engine is gone too. Two fsyncs were a third of a switch's own time.
        full = self._reserve.write(self._path(record.instance), json.dumps(asdict(record), sort_keys=True))
        if full is None:
            with contextlib.suppress(OSError):  # the record is written; the spare can wait
                self._reserve.keep()

    def remove(self, instance: str) -> None:
        self._written.pop(instance, None)
        with contextlib.suppress(FileNotFoundError, ValueError):
            self._reserve.retire(self._path(instance))

    def written(self, instance: str) -> Record | None:
        """The record this process wrote for ``instance``, from memory."""
        return self._written.get(instance)

    def load(self) -> tuple[Record, ...]:
        """Every record: the readable files, and ours whose file went missing (rewritten).

        Read every pass, so the spare is also made here once there is room again.
        """
        found = {r.instance: r for r in self._read()}
        with contextlib.suppress(OSError):  # no folder yet, or no room
            self._reserve.keep()
        for instance, record in self._written.items():
            if instance not in found:
                with contextlib.suppress(OSError):
                    self.write(record)
                found[instance] = record
        return tuple(found.values())

    def _read(self) -> list[Record]:
        """An unreadable or foreign-owned file is skipped, not trusted."""
        found: list[Record] = []
        try:
            names = sorted(os.listdir(self.folder))
        except OSError:
            return found
        for name in names:
            instance = name.removesuffix(".json")
            if not name.endswith(".json") or not _INSTANCE_ID.fullmatch(instance):
                continue
            path = self.folder / name
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            with os.fdopen(fd, "rb") as handle:
                st = os.fstat(handle.fileno())
                if st.st_uid != os.geteuid() or not stat.S_ISREG(st.st_mode):
                    continue
                try:
                    raw = json.loads(handle.read(1 << 16))
                    record = Record(**raw)
                except (ValueError, TypeError):
                    continue
            if record.instance == instance:
                found.append(record)
        return found

