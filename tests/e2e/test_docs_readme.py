"""The README's "Serve your own model" recipe path runs as written (tests/e2e/docs_runner.py)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.docs_runner import run_doc

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_recipe_path_trains_verifies_and_serves(tmp_path: Path) -> None:
    verify, listed = run_doc(ROOT / "README.md", tmp_path, only="own-recipe")
    assert (tmp_path / "my-models" / "speaker-vowels" / "1" / "model.onnx").is_file()
    assert '"status": "PASS"' in verify and '"model": "speaker-vowels/1"' in verify, verify[-2000:]
    assert listed.startswith("speaker-vowels v1 (latest)  features F=12"), listed
