"""The committed model repository: every model verifies, carries its card and its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export.verify import verify_model
from lstmserve.contract import read_description

MODELS = Path(__file__).resolve().parents[2] / "models"
VERSIONS = sorted(p for p in MODELS.glob("*/*") if (p / "model.onnx").exists())


def test_the_shipped_models_are_present() -> None:
    names = {p.parent.name for p in VERSIONS}
    assert {"speaker-vowels", "langid-chars"} <= names


@pytest.mark.parametrize("version_dir", VERSIONS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_model_verifies_and_has_card_and_report(version_dir: Path) -> None:
    report = verify_model(version_dir)
    assert report.passed, report.to_dict()
    desc = read_description(str(version_dir / "model.onnx"))
    assert desc.name == version_dir.parent.name and str(desc.version) == version_dir.name
    card = (version_dir / "README.md").read_text()
    training = json.loads((version_dir / "training_report.json").read_text())
    assert f"{training['test_accuracy'] * 100:.2f} %" in card
    assert desc.training["test_accuracy"] == training["test_accuracy"]
    assert "lstm-export train" in desc.training["command"]


def test_speaker_vowels_meets_the_accuracy_goal_on_the_official_test_split() -> None:
    desc = read_description(str(MODELS / "speaker-vowels" / "1" / "model.onnx"))
    assert desc.streamable and not desc.architecture["bidirectional"]
    assert desc.training["splits"]["test"] == 370
    assert desc.training["test_accuracy"] >= 0.97


def test_langid_reports_accuracy_per_language_and_by_characters_seen() -> None:
    report = json.loads((MODELS / "langid-chars" / "1" / "training_report.json").read_text())
    assert len(report["per_class_accuracy"]) >= 8
    assert "1" in report["accuracy_by_steps_seen"] and "8" in report["accuracy_by_steps_seen"]
    desc = read_description(str(MODELS / "langid-chars" / "1" / "model.onnx"))
    assert (
        desc.tokenizer is not None and desc.tokenizer.encode("été")[0] != desc.tokenizer.unknown_id
    )


def _readme_model_rows() -> dict[str, str]:
    """The README's "The shipped models" table: {NAME/VERSION: the row}."""
    readme = (MODELS.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## The shipped models", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {row.split("`")[1]: row for row in rows}


def test_the_readme_table_lists_every_shipped_model_with_its_card() -> None:
    """What `lstm-client list` shows against models/ is what the README's table lists, each
    version with its card; the int8 copies with their caveat."""
    rows = _readme_model_rows()
    assert sorted(rows) == sorted(f"{p.parent.name}/{p.name}" for p in VERSIONS)
    for name, row in rows.items():
        assert f"[card](models/{name}/README.md)" in row, row
        if read_description(str(MODELS / name / "model.onnx")).training.get("quantization"):
            assert "**Approximate and batch-dependent**" in row, row
    readme = (MODELS.parent / "README.md").read_text(encoding="utf-8")
    count = {3: "three", 4: "four", 5: "five", 6: "six"}[len(VERSIONS)]
    assert f"(`lstm-client list` shows all {count})" in readme
