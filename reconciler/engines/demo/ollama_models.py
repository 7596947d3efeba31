"""The Ollama stand-in's models: pulled ones "on disk" (what /api/tags and /api/show
describe) and loaded ones, each with a live runner (what /api/ps lists)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from reconciler.engines.demo.worker import MIB
from reconciler.engines.demo.worker_link import WorkerLink
from reconciler.kit import clock

CONTEXT_LENGTH = 4096
# Go's largest time.Duration: what real Ollama adds to "now" for keep_alive -1 (year ~2318).
FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)


def normalize(name: str) -> str:
    """``gemma2`` means ``gemma2:latest``, as in Ollama."""
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


@dataclass(frozen=True)
class PulledModel:
    """A model "on disk": what /api/tags and /api/show describe."""

    name: str
    size: int
    modified_at: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()

    @property
    def family(self) -> str:
        return self.name.split(":", 1)[0].rsplit("/", 1)[-1]

    def blob(self, models: Path) -> str:
        """The GGUF blob Ollama hands its runner (the stand-in never reads it)."""
        return str(models / "blobs" / f"sha256-{self.digest}")

    def details(self) -> dict[str, Any]:
        tag = self.name.split(":", 1)[1]
        size = tag.upper() if re.fullmatch(r"\d+(\.\d+)?[bBmM]", tag) else "7B"
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": size,
            "quantization_level": "Q4_0",
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


def catalogue(names: str, vram_mb: int) -> dict[str, PulledModel]:
    """The pulled models from the ``--models`` comma list."""
    stamp = clock.iso()
    models = [normalize(n.strip()) for n in names.split(",") if n.strip()]
    return {name: PulledModel(name, vram_mb * MIB, stamp) for name in models}


@dataclass
class LoadedModel:
    """A model with a live runner: what /api/ps lists."""

    pulled: PulledModel
    link: WorkerLink
    port: int
    expires_at: datetime = field(default_factory=clock.now)
    users: int = 0  # requests using it now; it never expires while one does
    expiry: asyncio.TimerHandle | None = None

    def keep(self, seconds: float | None) -> None:
        self.expires_at = clock.now() + (FOREVER if seconds is None else timedelta(seconds=seconds))

    def ps_entry(self) -> dict[str, Any]:
        m = self.pulled
        return {
            "name": m.name,
            "model": m.name,
            "size": m.size,
            "digest": m.digest,
            "details": m.details(),
            "expires_at": clock.iso(self.expires_at),
            "size_vram": m.size,
            "context_length": CONTEXT_LENGTH,
        }
