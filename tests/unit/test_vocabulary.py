"""The state file's words are the enums' words: the JSON Schema that documents them to UIs and
monitoring lists exactly the values the code can write, so neither grows a word the other lacks."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import pytest

from reconciler.domain.facts import Reason
from reconciler.domain.status import ConditionReason, ConditionType, Phase, PhaseReason
from reconciler.kit import schemas

REASONS: tuple[type[StrEnum], ...] = (Reason, PhaseReason, ConditionReason)


def listed(node: dict[str, Any]) -> list[str]:
    """The values a schema node allows, following ``$ref`` and ``anyOf`` to their enums."""
    if "$ref" in node:
        name = node["$ref"].removeprefix("#/$defs/")
        return listed(schemas.load("observed_state")["$defs"][name])
    if "anyOf" in node:
        return [value for choice in node["anyOf"] for value in listed(choice)]
    return list(node["enum"])


def at(*path: str) -> dict[str, Any]:
    node: dict[str, Any] = schemas.load("observed_state")
    for key in path:
        node = node[key]
    return node


CONDITION = ("properties", "conditions", "items", "properties")


@pytest.mark.parametrize(("path", "enums"), [
    (("properties", "phase"), (Phase,)),
    ((*CONDITION, "type"), (ConditionType,)),
    ((*CONDITION, "reason"), REASONS),
    (("properties", "last_error", "properties", "reason"), (Reason,)),
], ids=["phase", "condition type", "condition reason", "last_error reason"])
def test_schema_lists_exactly_the_enum_values(path: tuple[str, ...], enums: tuple[type[StrEnum], ...]) -> None:
    values = listed(at(*path))
    assert len(values) == len(set(values)), f"{'.'.join(path)} lists a value twice: {values}"
    assert set(values) == {member.value for enum in enums for member in enum}


def test_each_reason_is_spelled_once() -> None:
    """One member per meaning: a value in two reason enums would be two spellings of one word."""
    owners: dict[str, list[str]] = {}
    for enum in REASONS:
        for member in enum:
            owners.setdefault(member.value, []).append(f"{enum.__name__}.{member.name}")
    assert {value: names for value, names in owners.items() if len(names) > 1} == {}
