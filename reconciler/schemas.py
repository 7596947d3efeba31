"""Load the JSON Schemas and turn validation failures into one readable sentence each."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

# Error messages go into the observed state (world-readable) and every log line: a 600 KB
# string in a bad file must not become a 600 KB message, and a file that is not YAML at all
# (a symlink planted to a secret) must not have its content echoed back.
MAX_MESSAGE_CHARS = 300
# Unknown keys shown back as they are only when they look like a key someone typed.
_SHOWN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

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


def _message(error: jsonschema.ValidationError) -> str:
    """jsonschema's message, without echoing a whole-file string and cut to a sane length."""
    if error.validator == "type" and not error.absolute_path and isinstance(error.instance, str):
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return (f"a string of {len(error.instance)} characters (content not shown) is not of type "
                f"{', '.join(repr(t) for t in types)}")
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        extra = [k for k in error.instance if k not in known]
        shown = [repr(k) if isinstance(k, str) and _SHOWN_KEY.match(k)
                 else f"a key of {len(str(k))} characters (not shown)" for k in extra]
        if shown:
            verb = "was" if len(shown) == 1 else "were"
            return _cut(f"Additional properties are not allowed ({', '.join(shown)} {verb} unexpected)")
    return _cut(str(error.message))


def _cut(message: str) -> str:
    if len(message) > MAX_MESSAGE_CHARS:
        message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message)} characters in all)"
    return message


def validate(name: str, document: object, source: Path | str) -> None:
    """Raise InvalidFile naming the first (most relevant) problem, or return quietly."""
    validator = jsonschema.Draft202012Validator(load(name))
    error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    if error is not None:
        expected = error.schema.get("description") if error.validator == "additionalProperties" else None
        message = f"field '{_field(error)}': {_message(error)}"
        if expected:
            message += f" ({expected})"
        raise InvalidFile(source, message)
