"""Where no C compiler is found at install, the request path runs interpreted
(reconciler/gate/compiled.py): its own tests pass on a copy of the tree with nothing compiled.

CI tests the compiled build everywhere else; this is the one place the interpreted one runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import SESSION_CGROUP_ENV, TEST_RUN_ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
# The compiled modules' own tests: the pool, the body budget, the relayed heads, the front door.
REQUEST_PATH_TESTS = ("tests/unit/test_gate_upstream.py", "tests/unit/test_gate_clients.py",
                      "tests/unit/test_front_door_shapes.py", "tests/e2e/test_front_door.py")
RUN_DEADLINE_S = 540


def _tree_without_builds(root: Path) -> None:
    skip = shutil.ignore_patterns("*.so", "compiled.json", "__pycache__")
    for folder in ("reconciler", "tests", "schemas"):
        shutil.copytree(REPO / folder, root / folder, ignore=skip)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")


def test_the_request_path_passes_its_tests_interpreted(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    _tree_without_builds(root)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", SESSION_CGROUP_ENV)}
    env.update({"PYTHONPATH": str(root), TEST_RUN_ENV: uuid.uuid4().hex})
    how = subprocess.run([sys.executable, "-c", "from reconciler.gate import compiled; print(compiled.describe())"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=RUN_DEADLINE_S)
    assert how.stdout.startswith("request path interpreted"), how.stdout + how.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *REQUEST_PATH_TESTS],
                         cwd=root, env=env, capture_output=True, text=True, timeout=RUN_DEADLINE_S)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]
