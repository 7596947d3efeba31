"""File events only wake the loop; what changed is re-read by the next pass."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event, ignore: Path) -> None:
        self._wake = wake
        self._ignore = str(ignore.resolve())

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Atomic renames and ConfigMap-style symlink swaps show up as moves or creates of
        # *some* name in the directory; we don't care which: any event means "look again".
        paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        if all(p.startswith(self._ignore) or not p for p in paths):
            return
        if event.event_type in ("opened", "closed_no_write"):
            return
        self._wake.set()


def watch(directories: Iterable[Path], wake: threading.Event, ignore: Path) -> BaseObserver:
    """Watch each directory (not recursively); our own state dir's churn is ignored."""
    observer = Observer()
    handler = _Wake(wake, ignore)
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        observer.schedule(handler, str(directory), recursive=False)
    observer.daemon = True
    observer.start()
    return observer
