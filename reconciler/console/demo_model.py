"""``ailayer demo-model``: write a tiny random-weight llama in the format an engine loads."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from reconciler.console import Refused


class ModelFormat(StrEnum):
    """What ``demo-model`` writes: a GGUF file for llama.cpp, or a folder in HF layout for vLLM."""

    GGUF = "gguf"
    HF = "hf"


class MissingExtra(Refused):
    """The writer's optional dependencies are not installed; the message names the extra."""


def write(path: Path, seed: int, fmt: ModelFormat) -> str:
    """Write the model; returns the line that says what was written."""
    if fmt is ModelFormat.HF:
        try:
            from reconciler.engines.demomodel_hf import write_tiny_hf
        except ImportError as exc:
            raise MissingExtra(f"needs the hfmodel extra: pip install 'ailayer[hfmodel]' ({exc})") from None
        folder = write_tiny_hf(path, seed=seed)
        size = sum(f.stat().st_size for f in folder.iterdir())
        return f"wrote {folder} ({size} bytes in {len(list(folder.iterdir()))} files)"
    try:
        from reconciler.engines.demomodel import write_tiny_gguf
    except ImportError as exc:
        raise MissingExtra(f"needs the llama.cpp extra: pip install 'ailayer[llamacpp]' ({exc})") from None
    written = write_tiny_gguf(path, seed=seed)
    return f"wrote {written} ({written.stat().st_size} bytes)"
