"""`lstm-export inspect` and `lstm-export trace` as subprocesses on the shipped models, the
Jordan model and a model of your own with a config.pbtxt; bad input gets a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.integration.test_generic_models import write_model

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "export.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def test_inspect_json_on_the_shipped_models() -> None:
    done = _run("inspect", str(MODELS / "langid-chars"), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    (layer,) = report["layers"]
    assert layer["op"] == "LSTM" and layer["hidden_size"] == 256
    gates = [g["gate"] for g in layer["per_direction"][0]["gates"]]
    assert gates == ["i", "o", "f", "c"]
    assert report["recurrent_parameters"] == 4 * 256 * (48 + 256 + 2)
    text = _run("inspect", str(MODELS / "speaker-vowels" / "1"))
    assert (
        text.returncode == 0 and "gate z (update)" in text.stdout and "forget bias" in text.stdout
    )


def test_trace_langid_schmetterling_writes_json_and_png(tmp_path: Path) -> None:
    done = _run("trace", str(MODELS / "langid-chars"), "--text", "Schmetterling",
                "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "PASS" and summary["steps"] == 13
    assert summary["predicted"] == "german"
    assert max(summary["max_diff_vs_onnxruntime"].values()) <= 1e-5
    assert (tmp_path / "trace.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "trace.json").read_text())
    assert "".join(s["input"] for s in data["steps"]) == "schmetterling"


def test_trace_jordan_on_frames(tmp_path: Path) -> None:
    frames = str(ROOT / "examples" / "speaker3-utterance.csv")
    model = str(MODELS / "speaker-vowels-jordan" / "1")
    done = _run("trace", model, "--frames", frames, "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predicted"] == "speaker3"
    assert (tmp_path / "trace.png").stat().st_size > 5_000


def test_inspect_and_trace_a_model_of_your_own(tmp_path: Path) -> None:
    write_model(tmp_path, "own-lstm")
    inspect = _run("inspect", str(tmp_path / "own-lstm"), "--json")
    assert inspect.returncode == 0, inspect.stderr
    assert [la["op"] for la in json.loads(inspect.stdout)["layers"]] == ["LSTM", "LSTM"]
    trace = _run("trace", str(tmp_path / "own-lstm"), "--tokens", "1,2,3,4",
                 "--out", str(tmp_path / "t"))  # fmt: skip
    assert trace.returncode == 0, trace.stderr
    assert (tmp_path / "t" / "trace.png").stat().st_size > 5_000


def test_bad_input_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "frames.csv"
    bad.write_text("0.1,abc\n")
    done = _run("trace", str(MODELS / "speaker-vowels" / "1"), "--frames", str(bad),
                "--out", str(tmp_path / "o"))  # fmt: skip
    assert done.returncode == 2 and "--frames" in done.stderr
    done = _run("trace", str(MODELS / "langid-chars"), "--tokens", "x1", "--out", str(tmp_path))
    assert done.returncode == 2 and "--tokens must be integers" in done.stderr
    done = _run("inspect", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "no model.onnx" in done.stderr


def test_train_with_another_cell_names_the_model_after_it(tmp_path: Path) -> None:
    done = _run("train", "speaker-vowels", "--cell", "jordan", "--epochs", "2",
                "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    target = tmp_path / "speaker-vowels-jordan" / "1"
    report = json.loads((target / "training_report.json").read_text())
    assert report["architecture"]["cell"] == "jordan" and report["verify"]["passed"]
    assert "--cell jordan" in (target / "README.md").read_text()
    inspect = _run("inspect", str(target), "--json")
    assert json.loads(inspect.stdout)["layers"][0]["op"] == "Jordan (Scan)"
