"""The e2e fixtures: a gate started on its own (tests/e2e/standalone_gate.py), the processes a
test starts beside it, and demo engines for it to proxy to."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.standalone_gate import TOKEN, DemoEngine, Gate, Processes, start_gate, start_ollama, start_vllm


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path)
    yield p
    p.stop_all()


@pytest.fixture
def gate(procs: Processes, tmp_path: Path) -> Gate:
    """A gate with a toggle token and default staleness (30 s: no test outlives it)."""
    return start_gate(procs, tmp_path, token=TOKEN)


@pytest.fixture
def vllm(procs: Processes) -> DemoEngine:
    """A vLLM-like engine per test: the session's leak check allows nothing to outlive one."""
    return start_vllm(procs)


@pytest.fixture
def ollama_engine(procs: Processes) -> DemoEngine:
    return start_ollama(procs)
