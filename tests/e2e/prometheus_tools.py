"""Debian's `prometheus` package for the tests: promtool and the server. Missing, a test skips
on a developer's machine and fails in CI (CI=true), where .ci/run installs the package."""

from __future__ import annotations

import os
import shutil

import pytest


def prometheus_binary(name: str) -> str:
    """The path of `promtool` or `prometheus`; skip (fail in CI) when it is not installed."""
    found = shutil.which(name)
    if found is not None:
        return found
    message = f"no {name}: apt-get install prometheus (Debian's package; .ci/run installs it)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI must run this test")
    pytest.skip(message)
