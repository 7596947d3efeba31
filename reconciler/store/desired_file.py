"""desired_state.yaml on disk: read strictly, written atomically by one writer at a time."""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import yaml

from reconciler.domain import generation
from reconciler.domain.catalog import Catalog
from reconciler.domain.desired import Desired, UnknownModel, parse
from reconciler.domain.facts import Failure, Reason
from reconciler.kit import clock, schemas, yamlfile
from reconciler.kit.atomicfile import ensure_dir, write_atomic
from reconciler.kit.bootid import current_boot_id
from reconciler.kit.schemas import InvalidFile


def read(catalog: Catalog) -> Desired:
    """Missing file means IDLE; anything malformed raises InvalidFile."""
    path = catalog.desired_path
    try:
        document = yamlfile.read_yaml(path)
        written_at = path.stat().st_mtime
    except FileNotFoundError:
        return Desired(None, explicit=False)
    return replace(parse(document, path, catalog), written_at=written_at)


def look(catalog: Catalog) -> Desired | Failure:
    """The file as the loop takes it: a wish, or as a value why it cannot be one."""
    try:
        return read(catalog)
    except UnknownModel as exc:
        return Failure(Reason.UNKNOWN_MODEL, str(exc))
    except InvalidFile as exc:
        return Failure(Reason.INVALID_DESIRED_STATE, str(exc))


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
    """The reference writer for frontends: validate, number the toggle, replace atomically.

    The number is ``generation.to_write`` (why: see reconciler.domain.generation), taken
    under the writer lock so concurrent writers never share one.
    """
    path = catalog.desired_path
    if model is not None and model not in catalog.engines:
        raise UnknownModel(path, model, catalog.names())
    ensure_dir(path.parent)
    with _writer_lock(path):
        number = generation.to_write(_previous_generation(path), _observed_generation(catalog))
        return _replace(path, model, number, requested_by)


def _replace(path: Path, model: str | None, number: int, requested_by: str | None) -> Desired:
    document = {
        "model": model,
        "generation": number,
        "requested_by": requested_by or _whoami(),
        "requested_at": clock.iso(),
    }
    boot_id = current_boot_id()
    if boot_id is not None:
        document["boot_id"] = boot_id
    schemas.validate("desired_state", document, path)
    header = "# Written by ailayer toggle. model: a catalog name, or null for none (IDLE).\n"
    write_atomic(path, header + yaml.safe_dump(document, sort_keys=False))
    return Desired(model, number)


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@cli pid {os.getpid()}"
    except (KeyError, OSError):
        return f"uid {os.getuid()}@cli"
