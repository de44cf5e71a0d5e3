"""Where a model's files are, from what a user types: no optional package needed (describe runs
in the serving environment)."""

from __future__ import annotations

from pathlib import Path


def resolve_model(path: Path) -> Path:
    """A model.onnx, a version folder holding one, or a model folder (its highest version)."""
    if path.is_file():
        return path
    if (path / "model.onnx").is_file():
        return path / "model.onnx"
    versions = sorted(
        (int(p.name), p) for p in path.glob("*") if p.name.isdigit() and (p / "model.onnx").exists()
    )
    if not versions:
        raise FileNotFoundError(f"no model.onnx in {path} or in a numbered folder under it")
    return versions[-1][1] / "model.onnx"
