"""The seed's timeout audit as a test: find every timeout, and none may end a boot early.

Every module-level constant of the package whose name says it is a duration (``*_S``,
``*_MS``, ``*TIMEOUT*``) must be listed in docs/TIMEOUTS.md with its value, whether it is
on the boot path, and whether it can end a boot. Any that can end a boot must be at least
the default boot budget. Literal numbers passed as timeouts are refused outright: a timeout
without a name is a hidden timeout.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from reconciler.domain.catalog import DEFAULT_BOOT_TIMEOUT_S, load_file

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "reconciler"
DOC = REPO / "docs" / "TIMEOUTS.md"
DURATION = re.compile(r"(_S|_MS)$|TIMEOUT")
TIMEOUT_KW = re.compile(r"timeout|sock_read|sock_connect|^total$|deadline")
ROW = re.compile(r"^\|\s*`([\w.]+)`\s*\|\s*([^|]+?)\s*\|\s*(yes|no)\s*\|\s*(yes|no)\s*\|")


def _number(node: ast.expr) -> float | None:
    """A numeric constant, or simple arithmetic of them (``35 * 60``); None for anything else."""
    if isinstance(node, ast.Constant):
        value = node.value
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult | ast.Add | ast.Sub | ast.Div):
        left, right = _number(node.left), _number(node.right)
        if left is None or right is None:
            return None
        ops = {ast.Mult: left * right, ast.Add: left + right, ast.Sub: left - right}
        return ops.get(type(node.op), left / right if right else None)
    return None


def constants() -> dict[str, float]:
    found: dict[str, float] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.Assign | ast.AnnAssign) or node.value is None:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and DURATION.search(target.id):
                    value = _number(node.value)
                    if value is not None:
                        found[f"{module}.{target.id}"] = value
    return found


def documented() -> dict[str, tuple[float, bool, bool]]:
    rows: dict[str, tuple[float, bool, bool]] = {}
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            name, value, boot_path, ends_boot = match.groups()
            rows[name] = (float(value.replace("_", "")), boot_path == "yes", ends_boot == "yes")
    return rows


def test_the_audit_finds_the_known_timeouts() -> None:
    found = constants()
    assert found["reconciler.domain.catalog.DEFAULT_BOOT_TIMEOUT_S"] == 2700
    assert "reconciler.domain.catalog.DEFAULT_PROBE_TIMEOUT_S" in found
    assert len(found) > 20


def test_every_timeout_is_documented_with_its_value() -> None:
    found, doc = constants(), documented()
    missing = sorted(set(found) - set(doc))
    assert not missing, f"add these to docs/TIMEOUTS.md: {missing}"
    stale = sorted(set(doc) - set(found))
    assert not stale, f"docs/TIMEOUTS.md lists constants that no longer exist: {stale}"
    wrong = {name: (found[name], doc[name][0]) for name in found if found[name] != doc[name][0]}
    assert not wrong, f"documented values differ from the code (code, doc): {wrong}"


def test_nothing_on_the_boot_path_ends_a_boot_before_the_budget() -> None:
    early = {name: value for name, (value, on_path, ends) in documented().items()
             if on_path and ends and value < DEFAULT_BOOT_TIMEOUT_S}
    assert not early, f"these can end a boot before {DEFAULT_BOOT_TIMEOUT_S} s: {early}"
    assert DEFAULT_BOOT_TIMEOUT_S == 45 * 60


def test_no_two_minute_constant_survives_on_the_boot_path() -> None:
    """The seed's 120 s timeouts: none on the boot path, whatever its role."""
    on_path = {n: v for n, (v, path, _) in documented().items() if path and v == 120}
    assert not on_path


def test_no_literal_timeouts_in_the_package() -> None:
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                value = kw.value
                if kw.arg and TIMEOUT_KW.search(kw.arg) and isinstance(value, ast.Constant) \
                        and isinstance(value.value, int | float) and not isinstance(value.value, bool):
                    hidden.append(f"{path.relative_to(REPO)}:{node.lineno} {kw.arg}={value.value}")
    assert not hidden, f"name these timeouts (a constant with a reason, or configuration): {hidden}"


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_engines_own_load_timeouts_exceed_the_boot_budget(example: Path) -> None:
    """vLLM gives up on its engine core after 600 s and Ollama on a load after 5 min by default."""
    catalog = load_file(example, "--config")
    for engine in catalog.engines.values():
        assert engine.boot_timeout_s >= DEFAULT_BOOT_TIMEOUT_S
        for key in ("VLLM_ENGINE_READY_TIMEOUT_S", "OLLAMA_LOAD_TIMEOUT"):
            if key in engine.env:
                assert float(engine.env[key].rstrip("s")) > engine.boot_timeout_s, (engine.name, key)
        if engine.kind == "vllm":
            assert "VLLM_ENGINE_READY_TIMEOUT_S" in engine.env
        if engine.kind == "ollama":
            assert "OLLAMA_LOAD_TIMEOUT" in engine.env
