"""Fixtures the unit tests of the desired-file rules share."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.domain.catalog import Catalog, demo
from reconciler.kit.bootid import current_boot_id
from reconciler.plan.wish import Wishes


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    """The demo catalog in a scratch directory (its desired file there too)."""
    return demo(tmp_path)


@pytest.fixture
def wishes(catalog: Catalog) -> Wishes:
    """The desired-file rules, fresh: nothing taken yet, this boot."""
    return Wishes(catalog.desired_path, 0, current_boot_id(), booted_at=0.0)
