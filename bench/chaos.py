"""The fault suite at the issue's sizes: ``python bench/chaos.py [scenario ...] [--full]``.

The scenarios live with the tests (tests/chaos/scenarios.py), which run them at CI size; this
is only their command line, so nothing under tests/ imports bench/.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.chaos.scenarios import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
