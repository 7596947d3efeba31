"""Load the JSON Schemas and turn validation failures into one readable sentence each."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

_PACKAGED = Path(__file__).parent / "_schemas"
_CHECKOUT = Path(__file__).parent.parent / "schemas"


class InvalidFile(ValueError):
    """A file we read is not what its schema says; the message names file, field and expectation."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.detail = message


def schema_dir() -> Path:
    return _PACKAGED if _PACKAGED.is_dir() else _CHECKOUT


@cache
def load(name: str) -> dict[str, Any]:
    with (schema_dir() / f"{name}.schema.json").open(encoding="utf-8") as handle:
        schema: dict[str, Any] = json.load(handle)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _field(error: jsonschema.ValidationError) -> str:
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return path.lstrip(".") or "(top level)"


def validate(name: str, document: object, source: Path | str) -> None:
    """Raise InvalidFile naming the first (most relevant) problem, or return quietly."""
    validator = jsonschema.Draft202012Validator(load(name))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        expected = error.schema.get("description") if error.validator == "additionalProperties" else None
        message = f"field '{_field(error)}': {error.message}"
        if expected:
            message += f" ({expected})"
        raise InvalidFile(source, message)
