"""In fresh interpreters: checked-in stubs are fresh; the serving path never loads torch or
export/; the engine and the session layer load no gRPC or protobuf."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_architecture import WIRE, sources

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_stubs_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "codegen.py"), "--out", str(tmp_path)], check=True
    )
    generated = sorted(p.relative_to(tmp_path) for p in (tmp_path / "lstmserve").rglob("*.py*"))
    assert generated, "codegen wrote nothing"
    for rel in generated:
        checked_in = ROOT / rel
        assert checked_in.exists(), f"{rel} is not checked in: run python tools/codegen.py"
        assert checked_in.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run python tools/codegen.py"
        )


def test_serving_path_never_imports_torch_or_export() -> None:
    code = (
        "import sys, service.server, service.cli, lstmserve.client, lstmserve.client_cli; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'export'))]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("package", ["service.engine", "service.protocol"])
def test_engine_and_session_layer_load_no_grpc_or_protobuf(package: str) -> None:
    """Every module of the package imported in a fresh interpreter loads no wire module, however
    indirectly (tests/unit/test_architecture.py checks what they name)."""
    modules = [m for m in sources() if m.startswith(package)]
    code = (
        f"import sys, {', '.join(modules)}\n"
        f"bad = sorted(m for m in sys.modules if m.startswith({WIRE!r}))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_engine_loads_no_prometheus_client() -> None:
    """The engine records into the EngineMetrics it is given (service/metrics.py builds the
    real ones): every engine module imported loads neither service.metrics nor prometheus."""
    modules = [m for m in sources() if m.startswith("service.engine")]
    code = (
        f"import sys, {', '.join(modules)}\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('prometheus_client', "
        "'service.metrics', 'service.config')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
