"""docs/own-model-from-torch.md runs as written (tests/e2e/docs_runner.py)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.e2e.docs_runner import doc_blocks, run_doc

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "own-model-from-torch.md"


def test_the_from_torch_tutorial_runs_as_written(tmp_path: Path) -> None:
    assert [lang for lang, _, _ in doc_blocks(DOC)] == ["python", "python", "bash", "bash", "bash"]
    outputs = run_doc(DOC, tmp_path)
    assert (tmp_path / "repo" / "word-ending" / "1" / "model.onnx").is_file()
    assert '"status": "PASS"' in outputs[0] and '"recurrent": "encoder (GRU)"' in outputs[0]
    classify, stream = outputs[1].splitlines()[0], outputs[1]
    assert classify.startswith("word-ending v1  6 steps  vowel"), outputs[1]
    # What the doc says the stream ends with: the answer for the whole text.
    assert re.search(r"'sofa bed'\s+consonant 1\.000\nended after 8 steps", stream), stream
