"""Verdicts with evidence: what a simulation checked, what it saw, and whether it held."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Outcome = Literal["pass", "fail", "not_observed"]


@dataclass
class Check:
    name: str
    outcome: Outcome
    detail: str


@dataclass
class Report:
    scenario: str
    checks: list[Check] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, "pass" if ok else "fail", detail))
        return ok

    def not_observed(self, name: str, why: str) -> None:
        """Something this machine cannot show (no GPU): said plainly, never counted as a pass."""
        self.checks.append(Check(name, "not_observed", why))

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.outcome != "fail" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "passed": self.passed,
                "checks": [asdict(c) for c in self.checks], "evidence": self.evidence}

    def render(self) -> str:
        mark = {"pass": "PASS", "fail": "FAIL", "not_observed": "N/A "}
        lines = [f"== {self.scenario}: {'PASSED' if self.passed else 'FAILED'}"]
        lines += [f"  [{mark[c.outcome]}] {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def dump(reports: list[Report]) -> str:
    return json.dumps({"passed": all(r.passed for r in reports),
                       "scenarios": [r.to_dict() for r in reports]}, indent=2)
