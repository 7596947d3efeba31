"""Compiles the gate's request path with mypyc (reconciler/gate/compiled.py says which and why).

Everything else about the package is in pyproject.toml. The extensions are optional: without
a C compiler the build warns and the modules stay interpreted. AILAYER_PURE_PYTHON=1 skips
compiling altogether.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
COMPILED = runpy.run_path(str(ROOT / "reconciler" / "gate" / "compiled.py"), run_name="compiled")


class BuildPy(build_py):
    """Ships the JSON Schemas inside the package (reconciler/_schemas) for non-editable installs."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "reconciler" / "_schemas"
        target.mkdir(parents=True, exist_ok=True)
        for schema in (ROOT / "schemas").glob("*.json"):
            shutil.copy2(schema, target / schema.name)


def extensions() -> list[object]:
    if os.environ.get("AILAYER_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    modules = COMPILED["MODULES"]
    sources = [str(COMPILED["source_of"](m, ROOT).relative_to(ROOT)) for m in modules]
    built = {m: COMPILED["digest"](COMPILED["source_of"](m, ROOT)) for m in modules}
    Path(COMPILED["MANIFEST"]).write_text(json.dumps(built, indent=1) + "\n", encoding="utf-8")
    # Compile with what the build environment holds: pip's isolated one has none of the
    # package's dependencies (their types are Any there, as they are in the C code anyway),
    # so the project's strict mypy settings (tests run them) are not the build's, and a fresh
    # cache keeps a developer's .mypy_cache from making one build differ from another.
    with tempfile.TemporaryDirectory(prefix="ailayer-mypyc-") as scratch:
        config = Path(scratch) / "mypy.ini"
        config.write_text("[mypy]\nignore_missing_imports = True\n", encoding="utf-8")
        flags = ["--config-file", str(config), "--cache-dir", str(Path(scratch) / "cache")]
        exts = mypycify([*flags, *sources], opt_level="3")  # the C sources are written by now
    for ext in exts:
        ext.optional = True  # no C compiler: warn and stay interpreted
    return exts


setup(ext_modules=extensions(), cmdclass={"build_py": BuildPy})
