"""File events only wake the loop; what changed is re-read by the next pass."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from reconciler.kit.atomicfile import ensure_dir

# The events that can change a watched file. The kernel is asked for these only (watchdog
# turns the filter into the inotify mask): opens, reads and the folder's own "modified"
# events are most of a busy writer's traffic and never change what a pass reads.
RELEVANT_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent]


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event, names: set[str]) -> None:
        self._wake = wake
        self._names = names

    def _relevant(self, path: str) -> bool:
        name = os.path.basename(path)
        # Kubernetes swaps a ConfigMap by renaming "..data_tmp" over the "..data" symlink.
        return name in self._names or name.startswith("..")

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
        if any(p and self._relevant(p) for p in paths):
            self._wake.set()


def watch(files: Iterable[Path], wake: threading.Event) -> BaseObserver:
    """Watch the folders of ``files`` (not recursively), waking only for those names.

    Other files in the same folder (a terminal log, an editor's scratch file) must not
    wake the loop, or a busy neighbour turns into a busy loop.
    """
    observer = Observer()
    by_dir: dict[Path, set[str]] = {}
    for file in files:
        by_dir.setdefault(file.parent, set()).add(file.name)
    for directory, names in by_dir.items():
        ensure_dir(directory)
        observer.schedule(_Wake(wake, names), str(directory), recursive=False,
                          event_filter=RELEVANT_EVENTS)
    observer.daemon = True
    observer.start()
    return observer
