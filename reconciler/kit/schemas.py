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

_PACKAGED = Path(__file__).parents[1] / "_schemas"
_CHECKOUT = Path(__file__).parents[2] / "schemas"


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


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}
_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


def _kind(value: object) -> str:
    if isinstance(value, str):
        return f"a string of {len(value)} characters"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _message(error: jsonschema.ValidationError) -> str:
    """What the field must be, from the schema alone: never the value found in the file.

    The file may be a symlink to a secret, and the message lands in world-readable state,
    the log and /status; only the *kind* of value found is named.
    """
    rule, want, found = error.validator, error.validator_value, error.instance
    if rule == "type":
        types = want if isinstance(want, list) else [want]
        return f"expected {' or '.join(map(str, types))}, found {_kind(found)} (value not shown)"
    if rule == "additionalProperties" and isinstance(found, dict):
        known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
        shown = [repr(k) if isinstance(k, str) and _SHOWN_KEY.match(k)
                 else f"a key of {len(str(k))} characters (not shown)" for k in found if k not in known]
        verb = "was" if len(shown) == 1 else "were"
        return _cut(f"Additional properties are not allowed ({', '.join(shown)} {verb} unexpected)")
    if rule == "required" and isinstance(found, dict) and isinstance(want, list):
        missing = [k for k in want if k not in found]
        return f"missing required field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
    if rule == "enum" and isinstance(want, list):
        return _cut(f"must be one of {', '.join(map(repr, want))} (value not shown)")
    if rule == "const":
        return f"must be {want!r}"
    if rule in _BOUNDS:
        return f"must be {_BOUNDS[rule]} {want}"
    if rule == "pattern":
        return _cut(f"must match {want} (value not shown)")
    if rule in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        return f"violates {rule} {want}"
    if rule == "propertyNames":
        return "a key does not follow the naming rule (key not shown)"
    return f"does not satisfy the schema's {rule} rule (value not shown)"


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
