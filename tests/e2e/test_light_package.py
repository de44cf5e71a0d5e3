"""The light package stays light: the client imports no serving dependency."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("onnxruntime", "redis", "prometheus_client", "torch", "service")


@pytest.mark.parametrize(
    "module", ["lstmserve.client", "lstmserve.client_cli", "lstmserve.contract"]
)
def test_light_modules_load_no_serving_dependency(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "[]", f"import {module} loaded {out}"
