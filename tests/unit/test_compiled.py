"""The compiled request path (reconciler/gate/compiled.py): a build of an older source is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reconciler.gate import compiled

REPO = Path(__file__).resolve().parents[2]


def _copy_sources(root: Path) -> None:
    for module in compiled.MODULES:
        target = compiled.source_of(module, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(compiled.source_of(module, REPO), target)


def test_a_source_changed_after_its_build_is_stale(tmp_path: Path) -> None:
    if not compiled.compiled():
        pytest.skip("the request path runs interpreted here: nothing can be stale")
    _copy_sources(tmp_path)
    manifest = tmp_path / "compiled.json"
    built = {m: compiled.digest(compiled.source_of(m, tmp_path)) for m in compiled.MODULES}
    manifest.write_text(json.dumps(built))
    assert compiled.stale(manifest, tmp_path) == []
    edited = compiled.compiled()[0]
    with compiled.source_of(edited, tmp_path).open("a") as source:
        source.write("# edited after the build\n")
    assert compiled.stale(manifest, tmp_path) == [edited]
    manifest.unlink()  # no record of what was compiled: every compiled module is suspect
    assert compiled.stale(manifest, tmp_path) == compiled.compiled()


def test_the_start_up_line_says_how_the_request_path_runs() -> None:
    line = compiled.describe()
    if compiled.compiled():
        assert line.startswith("request path compiled with mypyc (frontdoor, upstream, hosts, bodies, budget)")
    else:
        assert line.startswith("request path interpreted")
