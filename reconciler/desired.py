"""desired_state.yaml: the frontend toggle's one-line wish, read strictly and written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from reconciler import clock, schemas, yamlfile
from reconciler.atomicfile import ensure_dir, write_atomic
from reconciler.catalog import Catalog
from reconciler.schemas import InvalidFile


@dataclass(frozen=True)
class Desired:
    """``model=None`` is IDLE: nothing is served and nothing is picked automatically."""

    model: str | None
    generation: int | None = None
    explicit: bool = True  # False: no file, an empty one, or no `model` key (not `model: null`)


class UnknownModel(InvalidFile):
    def __init__(self, path: Path | str, model: str, known: list[str]) -> None:
        super().__init__(path, f"field 'model': unknown model {model!r}; known: {', '.join(known)}")
        self.model = model
        self.known = known


def parse(document: object, source: Path | str, catalog: Catalog) -> Desired:
    schemas.validate("desired_state", document, source)
    if document is None:
        return Desired(None, explicit=False)
    assert isinstance(document, dict)
    model = document.get("model")
    if model is not None and model not in catalog.engines:
        raise UnknownModel(source, model, catalog.names())
    return Desired(model, document.get("generation"), explicit="model" in document)


def read(catalog: Catalog) -> Desired:
    """Missing file means IDLE; anything malformed raises InvalidFile."""
    path = catalog.desired_path
    try:
        document = yamlfile.read_yaml(path)
    except FileNotFoundError:
        return Desired(None, explicit=False)
    return parse(document, path, catalog)


def _previous_generation(path: Path) -> int:
    try:
        document = yamlfile.read_yaml(path)
    except (FileNotFoundError, InvalidFile):
        return 0
    if isinstance(document, dict) and isinstance(document.get("generation"), int):
        return int(document["generation"])
    return 0


def _observed_generation(catalog: Catalog) -> int:
    """The generation the reconciler last reported: it counts toggles of a file without one."""
    try:
        value = json.loads(catalog.observed_path.read_text()).get("desired_generation", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    """One writer at a time (toggles from the CLI and the gate's threads): read, bump, replace."""
    lock = path.parent / f".{path.name}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write(catalog: Catalog, model: str | None, requested_by: str | None = None) -> Desired:
    """The reference writer for frontends: validate, bump the generation, replace atomically.

    The generation only ever rises: above the file's and above what the reconciler reported
    (a hand edit may drop it), and concurrent writers never share one.
    """
    path = catalog.desired_path
    if model is not None and model not in catalog.engines:
        raise UnknownModel(path, model, catalog.names())
    ensure_dir(path.parent)
    with _writer_lock(path):
        generation = max(_previous_generation(path), _observed_generation(catalog)) + 1
        return _replace(path, model, generation, requested_by)


def _replace(path: Path, model: str | None, generation: int, requested_by: str | None) -> Desired:
    document = {
        "model": model,
        "generation": generation,
        "requested_by": requested_by or _whoami(),
        "requested_at": clock.iso(),
    }
    schemas.validate("desired_state", document, path)
    header = "# Written by ailayer toggle. model: a catalog name, or null for none (IDLE).\n"
    write_atomic(path, header + yaml.safe_dump(document, sort_keys=False))
    return Desired(model, generation)


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@cli pid {os.getpid()}"
    except (KeyError, OSError):
        return f"uid {os.getuid()}@cli"
