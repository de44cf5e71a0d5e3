"""`lstm-export` as a subprocess: train -> export -> verify -> describe, on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"TQDM_DISABLE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "export.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_train_exports_a_verified_model_with_card_and_report(tmp_path: Path) -> None:
    done = _run(
        "train", "speaker-vowels", "--out", str(tmp_path), "--version", "7", "--epochs", "2"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    target = tmp_path / "speaker-vowels" / "7"
    assert {p.name for p in target.iterdir()} == {"model.onnx", "README.md", "training_report.json"}
    report = json.loads((target / "training_report.json").read_text())
    assert report["test_examples"] == 370 and report["verify"]["passed"]
    assert report["training"]["epochs_run"] == 2
    card = (target / "README.md").read_text()
    assert "CC BY 4.0" in card and "lstm-export train speaker-vowels" in card

    verify = _run("verify", str(target))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(verify.stdout.splitlines()[-1])["status"] == "PASS"

    describe = _run("describe", str(target))
    desc = json.loads(describe.stdout)
    assert desc["name"] == "speaker-vowels" and desc["version"] == 7
    assert desc["feature_dim"] == 12 and desc["streamable"] is True


def test_verify_fails_loudly_on_a_file_that_is_not_a_model(tmp_path: Path) -> None:
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"not an onnx file")
    done = _run("verify", str(bogus))
    assert done.returncode != 0
