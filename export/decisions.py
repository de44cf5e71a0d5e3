"""What early decisions buy a shipped model: steps used against accuracy on its held-out test
split, for a range of decision rules, written into its training report and model card.

    python -m export.decisions models/speaker-vowels/1          # table into report + card
    python -m export.decisions models/speaker-vowels/1 --plot   # and early_decisions.png

Every test sequence runs once through the exported model (onnxruntime, one padded batch); each
rule is judged over its per-step probabilities exactly as a session judges it
(service/engine/session/decisions.py): the answer is the decided label at the step where the
rule first held, or, if it never held, the last step's answer after the whole sequence. Nothing
is downloaded: the test split is read as the model's recipe reads it (export/recipes.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from export.cards import decisions_markdown, model_card
from export.data import Example
from export.verify import open_session, run_onnx
from lstmserve.contract import ModelDescription, read_description
from service.engine.session.decisions import NO_RUN, judge
from service.engine.types import DecisionRule

PROBABILITIES = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999)
MARGINS = (0.8, 0.9, 0.98)
RUNS = (1, 3)  # consecutive steps
BATCH = 1024


def step_probabilities(
    path: Path, desc: ModelDescription, examples: list[Example]
) -> list[np.ndarray]:
    """Each example's per-step probabilities (T_i, C), from zero states."""
    sess = open_session(path)
    out: list[np.ndarray] = []
    for start in range(0, len(examples), BATCH):
        part = examples[start : start + BATCH]
        lengths = np.array([len(e.x) for e in part], dtype=np.int64)
        shape = (len(part), int(lengths.max()), *part[0].x.shape[1:])
        x = np.zeros(shape, dtype=part[0].x.dtype)  # (B, T) or (B, T, F)
        for b, e in enumerate(part):
            x[b, : len(e.x)] = e.x
        state = np.zeros((len(part), desc.state_rows, desc.hidden_size), dtype=np.float32)
        step_probs, _, _ = run_onnx(sess, desc, x, lengths, state)
        out += [step_probs[b, : lengths[b]] for b in range(len(part))]
    return out


def evaluate(
    rule: DecisionRule | None, rows: list[np.ndarray], labels: np.ndarray
) -> dict[str, Any]:
    """Accuracy, mean steps used and the share decided before the end, under `rule` (None: the
    whole sequence, the last step's answer)."""
    answers, used, early = [], [], 0
    for probs in rows:
        decision = judge(rule, NO_RUN, probs, len(probs), 0)[1] if rule is not None else None
        if decision is None:
            answers.append(int(probs[-1].argmax()))
            used.append(len(probs))
        else:
            answers.append(decision.label)
            used.append(decision.step)
            early += decision.step < len(probs)
    full = sum(len(p) for p in rows)
    return {
        "accuracy": float(np.mean(np.array(answers) == labels)),
        "mean_steps": float(np.mean(used)),
        "steps_fraction": float(sum(used) / full),
        "decided_early": early / len(rows),
    }


def decision_table(path: Path, examples: list[Example]) -> dict[str, Any]:
    """Every rule of the sweep (and the whole sequence) on the examples."""
    desc = read_description(str(path / "model.onnx"))
    rows = step_probabilities(path / "model.onnx", desc, examples)
    labels = np.array([e.label for e in examples])
    table = []
    for n in RUNS:
        for p in PROBABILITIES:
            table.append({"rule": f"{p:g},{n}", **evaluate(DecisionRule(p, steps=n), rows, labels)})
        for m in MARGINS:
            rule = DecisionRule(margin=m, steps=n)
            table.append({"rule": f"margin:{m:g},{n}", **evaluate(rule, rows, labels)})
    return {"examples": len(examples), "full": evaluate(None, rows, labels), "rules": table}


def plot(found: dict[str, Any], out: Path, title: str, unit: str) -> None:
    """Accuracy against the share of steps used, one line per rule family; small PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=80)
    for n in RUNS:
        for prefix, marker in (("", "o"), ("margin:", "s")):
            rows = [
                r for r in found["rules"]
                if r["rule"].endswith(f",{n}") and r["rule"].startswith("margin:") == bool(prefix)
            ]  # fmt: skip
            xs = [100 * r["steps_fraction"] for r in rows]
            ys = [100 * r["accuracy"] for r in rows]
            family = "margin M" if prefix else "probability P"
            ax.plot(xs, ys, marker=marker, ms=3, lw=1, label=f"{family}, N={n}")
    full = found["full"]
    ax.axhline(100 * full["accuracy"], color="k", lw=0.8, ls="--", label="whole sequence")
    ax.set_xlabel(f"{unit} used (% of all)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.decisions", description=__doc__)
    parser.add_argument("version_dir", type=Path, help="e.g. models/speaker-vowels/1")
    parser.add_argument("--plot", action="store_true", help="also write early_decisions.png")
    args = parser.parse_args(argv)
    from export.recipes import RECIPES  # torch: the recipes train too

    report_path = args.version_dir / "training_report.json"
    report = json.loads(report_path.read_text())
    dataset, _ = RECIPES[report["model"].split("/")[0]].load()  # "speaker-vowels/1"
    found = decision_table(args.version_dir, dataset.test)
    desc = read_description(str(args.version_dir / "model.onnx"))
    unit = "characters" if desc.input_kind == "tokens" else "frames"
    if args.plot:
        title = f"{report['model']}: early decisions"
        plot(found, args.version_dir / "early_decisions.png", title, unit)
    found |= {"plot": args.plot, "command": f"python -m export.decisions {args.version_dir}"}
    report["early_decisions"] = found
    report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    (args.version_dir / "README.md").write_text(model_card(report, desc))
    print(decisions_markdown(found, unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
