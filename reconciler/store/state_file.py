"""observed_state.json on disk: written atomically after every pass, read by the gate and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconciler.domain.status import Status
from reconciler.kit.atomicfile import ensure_dir, write_atomic


def write(path: Path, status: Status) -> None:
    ensure_dir(path.parent)
    write_atomic(path, status.to_json(), mode=0o640, durable=False)  # rewritten every pass


def read_raw(path: Path) -> dict[str, Any]:
    """The file as a dict (for the gate and the CLI); raises OSError/ValueError on trouble."""
    with path.open(encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or "phase" not in data:
        raise ValueError(f"{path}: not an observed-state document")
    return data
