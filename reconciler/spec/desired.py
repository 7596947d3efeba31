"""desired_state.yaml: the frontend toggle's one-line wish, read strictly and written atomically."""

from __future__ import annotations

import contextlib
import fcntl
import functools
import getpass
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from reconciler.kit import clock, schemas, yamlfile
from reconciler.kit.atomicfile import ensure_dir, write_atomic
from reconciler.kit.schemas import InvalidFile
from reconciler.spec.catalog import Catalog


@dataclass(frozen=True)
class Desired:
    """``model=None`` is IDLE: nothing is served and nothing is picked automatically."""

    model: str | None
    generation: int | None = None
    explicit: bool = True  # False: no file, an empty one, or no `model` key (not `model: null`)
    # Provenance, not the wish itself: the machine's boot when it was written (None: not
    # recorded), and the file's mtime (judges a hand-written file without a boot id).
    boot_id: str | None = field(default=None, compare=False)
    written_at: float | None = field(default=None, compare=False)


BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


@functools.cache
def current_boot_id() -> str | None:
    """This boot of the machine (Linux), or None where it cannot be read."""
    try:
        return BOOT_ID_PATH.read_text().strip() or None
    except OSError:
        return None


def before_this_boot(wish: Desired, boot_id: str | None, booted_at: float) -> bool:
    """Whether ``wish`` was written before the machine last booted: by its recorded boot id,
    else (a hand-written file) by its mtime against the boot time."""
    if wish.boot_id is not None and boot_id is not None:
        return wish.boot_id != boot_id
    return wish.written_at is not None and wish.written_at < booted_at


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
    return Desired(model, document.get("generation"), explicit="model" in document,
                   boot_id=document.get("boot_id"))


def read(catalog: Catalog) -> Desired:
    """Missing file means IDLE; anything malformed raises InvalidFile."""
    path = catalog.desired_path
    try:
        document = yamlfile.read_yaml(path)
        written_at = path.stat().st_mtime
    except FileNotFoundError:
        return Desired(None, explicit=False)
    return replace(parse(document, path, catalog), written_at=written_at)


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
    boot_id = current_boot_id()
    if boot_id is not None:
        document["boot_id"] = boot_id
    schemas.validate("desired_state", document, path)
    header = "# Written by ailayer toggle. model: a catalog name, or null for none (IDLE).\n"
    write_atomic(path, header + yaml.safe_dump(document, sort_keys=False))
    return Desired(model, generation)


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@cli pid {os.getpid()}"
    except (KeyError, OSError):
        return f"uid {os.getuid()}@cli"
