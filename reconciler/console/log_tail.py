"""``ailayer logs``: which activity log to read, its last lines, and following it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from reconciler.kit import clock


def readable_log(path: Path, fallback: Path) -> Path:
    """The log the reconciler writes: the wanted one, or the state dir's fallback when the
    wanted one cannot be read, is missing, or is older (the reconciler fell back to it)."""
    def readable(p: Path) -> bool:
        return p.is_file() and os.access(p, os.R_OK)

    if not readable(fallback):
        return path
    if not readable(path) or fallback.stat().st_mtime > path.stat().st_mtime:
        return fallback
    return path


def show(path: Path, lines: int, follow: bool, say: Callable[[str], None]) -> None:
    """``say`` the last ``lines`` lines, then, when following, each new one until interrupted."""
    with path.open("rb") as handle:
        for raw in handle.read().splitlines()[-lines:]:
            say(raw.decode("utf-8", "replace"))
        while follow:
            chunk = handle.readline()
            if chunk:
                say(chunk.decode("utf-8", "replace").rstrip("\n"))
            else:
                clock.sleep(0.2)
