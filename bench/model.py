"""The benchmark's model repository: a random 2-layer LSTM (+ langid-chars/1 when present)."""

from __future__ import annotations

import shutil
from pathlib import Path

BENCH_MODEL = "bench-lstm"
ROOT = Path(__file__).resolve().parent.parent
LANGID = ROOT / "models" / "langid-chars" / "1"


def build_repository(repo: Path) -> dict[str, Path]:
    """Write bench-lstm/1 (tokens, vocab 1000, embedding 128, 2x LSTM 256, 4 classes) into
    `repo`, and copy langid-chars/1 if the repository has it; returns model name -> model.onnx."""
    from export.arch import ArchConfig
    from export.onnx_export import describe, export_model
    from export.tiny import random_model

    arch = ArchConfig(
        cell="lstm", hidden_size=256, num_classes=4, input_kind="tokens", num_layers=2,
        vocab_size=1000, embedding_dim=128,
    )  # fmt: skip
    model = random_model(arch, seed=0, scale=0.1)
    labels = [f"class{i}" for i in range(arch.num_classes)]
    desc = describe(model, BENCH_MODEL, 1, labels, training={"data": "random (benchmark)"})
    path = repo / BENCH_MODEL / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model(model, desc, str(path))
    paths = {BENCH_MODEL: path}
    if (LANGID / "model.onnx").exists():
        target = repo / "langid-chars" / "1"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(LANGID / "model.onnx", target / "model.onnx")
        paths["langid-chars"] = target / "model.onnx"
    return paths
