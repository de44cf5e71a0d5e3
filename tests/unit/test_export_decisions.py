"""The early-decision table of a model card (export/decisions.py): every rule judged as a
session judges it, the whole sequence's answer as the last step's, and the card's section."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export.cards import decisions_markdown
from export.data import Example
from export.decisions import decision_table, step_probabilities
from lstmserve.contract import read_description

ROOT = Path(__file__).resolve().parents[2]


def test_the_table_judges_each_rule_over_the_models_own_step_probabilities(
    tiny_repo: Path,
) -> None:
    folder = tiny_repo / "tiny-rnn-frames" / "1"
    desc = read_description(str(folder / "model.onnx"))
    rng = np.random.default_rng(0)
    examples = [
        Example(rng.normal(size=(int(n), desc.feature_dim)).astype(np.float32), int(n) % 4)
        for n in rng.integers(1, 12, size=40)
    ]
    rows = step_probabilities(folder / "model.onnx", desc, examples)
    assert [len(r) for r in rows] == [len(e.x) for e in examples]
    found = decision_table(folder, examples)
    last = np.array([r[-1].argmax() for r in rows]) == np.array([e.label for e in examples])
    assert found["full"]["accuracy"] == last.mean() and found["full"]["steps_fraction"] == 1.0
    for row in found["rules"]:
        assert 0 < row["steps_fraction"] <= 1 and 0 <= row["decided_early"] <= 1
    lenient = next(r for r in found["rules"] if r["rule"] == "0.5,1")
    strict = next(r for r in found["rules"] if r["rule"] == "0.999,3")
    assert lenient["mean_steps"] <= strict["mean_steps"]
    table = decisions_markdown(found, "frames")
    assert table.count("\n") == len(found["rules"]) + 2 and "`margin:0.9,3`" in table


def test_the_shipped_cards_show_their_decision_tables() -> None:
    for model in ("speaker-vowels", "langid-chars"):
        folder = ROOT / "models" / model / "1"
        report = json.loads((folder / "training_report.json").read_text())
        card = (folder / "README.md").read_text()
        found = report["early_decisions"]
        assert (
            decisions_markdown(found, "frames" if model == "speaker-vowels" else "characters")
            in card
        )
        assert f"{report['test_accuracy'] * 100:.2f} %" in card
        assert (folder / "early_decisions.png").stat().st_size < 64_000
