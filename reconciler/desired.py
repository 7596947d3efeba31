"""desired_state.yaml: the frontend toggle's one-line wish, read strictly and written atomically."""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from reconciler import clock, schemas, yamlfile
from reconciler.atomicfile import write_atomic
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


def write(catalog: Catalog, model: str | None, requested_by: str | None = None) -> Desired:
    """The reference writer for frontends: validate, bump the generation, replace atomically."""
    path = catalog.desired_path
    if model is not None and model not in catalog.engines:
        raise UnknownModel(path, model, catalog.names())
    generation = _previous_generation(path) + 1
    document = {
        "model": model,
        "generation": generation,
        "requested_by": requested_by or _whoami(),
        "requested_at": clock.iso(),
    }
    schemas.validate("desired_state", document, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Written by ailayer toggle. model: a catalog name, or null for none (IDLE).\n"
    write_atomic(path, header + yaml.safe_dump(document, sort_keys=False))
    return Desired(model, generation)


def _whoami() -> str:
    try:
        return f"{getpass.getuser()}@cli pid {os.getpid()}"
    except (KeyError, OSError):
        return f"uid {os.getuid()}@cli"
