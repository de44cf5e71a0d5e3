"""deploy/tools/metrics_reference.py loaded as a module, for the deployment tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load_reference() -> ModuleType:
    path = ROOT / "deploy" / "tools" / "metrics_reference.py"
    spec = importlib.util.spec_from_file_location("metrics_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
