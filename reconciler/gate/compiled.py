"""Which gate modules mypyc compiles to C at install time, and whether that build is current.

Why compiled: the front door's own Python was over half of a proxied small request's CPU;
compiled, the same source costs about a third less per request (35.9 against 23.1 µs in one
run, docs/PERFORMANCE.md). The
source stays plain, mypy-strict Python; where no C compiler is found at install time the
modules run interpreted, slower but the same.

A compiled module (a ``.so`` beside the ``.py``) shadows its source, so a source edited after
``pip install -e .`` would silently not run. ``setup.py`` records a hash of each source it
compiled; ``stale()`` names the modules whose source changed since, the gate logs them at start
and the test suite refuses to run on them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

# The request path: the front door, the engine connection pool, the Host check, the body check,
# the body budget.
MODULES = ("reconciler.gate.frontdoor", "reconciler.gate.upstream", "reconciler.gate.hosts",
           "reconciler.gate.bodies", "reconciler.gate.budget")
# Written by setup.py next to this file: {module: sha256 of the source it compiled}.
MANIFEST = Path(__file__).with_name("compiled.json")
_ROOT = Path(__file__).resolve().parents[2]


def source_of(module: str, root: Path = _ROOT) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compiled() -> list[str]:
    """The modules that import as compiled extensions."""
    found = []
    for module in MODULES:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin is not None and not spec.origin.endswith(".py"):
            found.append(module)
    return found


def stale(manifest: Path = MANIFEST, root: Path = _ROOT) -> list[str]:
    """Compiled modules whose source differs from the one compiled (rebuild: pip install -e .)."""
    try:
        built = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        built = {}
    out = []
    for module in compiled():
        source = source_of(module, root)
        if source.is_file() and built.get(module) != digest(source):
            out.append(module)
    return out


def describe() -> str:
    """One line for the gate's start-up log."""
    done = compiled()
    if not done:
        return "request path interpreted (not compiled at install: no C compiler, or AILAYER_PURE_PYTHON=1)"
    names = ", ".join(m.rsplit(".", 1)[1] for m in done)
    late = stale()
    if late:
        return (f"request path compiled ({names}), but STALE: {', '.join(late)} changed since; "
                "the old build runs until `pip install -e .` is run again")
    return f"request path compiled with mypyc ({names})"
