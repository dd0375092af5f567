"""Fixtures of real components (Postgres, Ray, servers) for every test directory that needs them."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.harness"]

_TESTS = Path(__file__).parent
_MARKED_BY_DIRECTORY = {
    _TESTS / "integration": pytest.mark.integration,
    _TESTS / "reliability": pytest.mark.reliability,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for directory, marker in _MARKED_BY_DIRECTORY.items():
            if directory in Path(item.path).parents:
                item.add_marker(marker)
