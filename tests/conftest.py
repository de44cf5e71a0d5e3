"""Shared fixtures: a model repository of tiny exported models of every architecture."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its folder: tests/unit, tests/integration, tests/e2e."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for marker in ("unit", "integration", "e2e"):
            if marker in parts:
                item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository (name/version/model.onnx) of tiny random models, built once."""
    from export.tiny import write_tiny_repository

    repo = tmp_path_factory.mktemp("models")
    write_tiny_repository(repo)
    return repo
