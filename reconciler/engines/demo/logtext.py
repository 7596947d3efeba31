"""Log output as the real engines write it: whole lines flushed at once, tqdm-style bars
redrawn in place with a carriage return, and tracebacks ending in the line log scrapers seek."""

from __future__ import annotations

import contextlib
import sys
from typing import TextIO


def emit(line: str, stream: TextIO | None = None) -> None:
    """Write one whole line and flush; a vanished reader must not kill an orphan."""
    target = stream if stream is not None else sys.stdout
    with contextlib.suppress(OSError, ValueError):
        target.write(line + "\n")
        target.flush()


def emit_progress(text: str, stream: TextIO | None = None) -> None:
    """Redraw a progress bar in place with a carriage return, as tqdm does."""
    target = stream if stream is not None else sys.stderr
    with contextlib.suppress(OSError, ValueError):
        target.write("\r" + text)
        target.flush()


def _mmss(seconds: float) -> str:
    whole = max(0, int(seconds))
    return f"{whole // 60:02d}:{whole % 60:02d}"


def progress_text(label: str, done: int, total: int, elapsed: float, per_step: float) -> str:
    """A tqdm-looking bar: ``label:  40% Completed | 2/5 [00:01<00:01,  1.50it/s]``."""
    pct = int(100 * done / total) if total else 100
    remaining = (total - done) * per_step
    rate = done / elapsed if elapsed > 0 else 0.0
    return f"{label}: {pct:3d}% Completed | {done}/{total} [{_mmss(elapsed)}<{_mmss(remaining)}, {rate:5.2f}it/s]"


def traceback_lines(where: str, error: str) -> list[str]:
    """A traceback-looking block ending in the error line that log scrapers look for."""
    return [
        "Traceback (most recent call last):",
        f'  File "{where}", line 1, in load_model',
        error,
    ]
