"""Checked-in stubs are fresh; the serving path never imports torch or export/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_engine_never_imports_grpc() -> None:
    code = (
        "import sys, service.engine.core, service.engine.registry, service.engine.sessions; "
        "bad = [m for m in sys.modules if m == 'grpc' or m.startswith('grpc')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
