"""Tiny random-weight models of every architecture, for tests and benchmarks (no training)."""

from __future__ import annotations

import string
from pathlib import Path

import torch

from export.arch import ArchConfig
from export.jordan import JordanClassifier, build_model
from export.model import RecurrentClassifier
from export.onnx_export import describe, export_model

TINY_VOCAB = ["<unk>", *string.ascii_lowercase, " "]
TINY_TOKENIZER = {"type": "chars", "vocab": TINY_VOCAB, "lowercase": True, "unknown_id": 0}

# name -> architecture of the tiny models every test suite can build in a temp dir.
TINY_ARCHS: dict[str, ArchConfig] = {
    "tiny-lstm": ArchConfig(cell="lstm", hidden_size=8, num_classes=3, input_kind="tokens",
                            num_layers=2, vocab_size=len(TINY_VOCAB), embedding_dim=6),
    "tiny-gru": ArchConfig(cell="gru", hidden_size=8, num_classes=3, input_kind="tokens",
                           vocab_size=len(TINY_VOCAB), embedding_dim=6),
    "tiny-rnn-frames": ArchConfig(cell="rnn", hidden_size=8, num_classes=4, input_kind="features",
                                  feature_dim=5),
    "tiny-peephole-frames": ArchConfig(cell="lstm", peephole=True, hidden_size=8, num_classes=4,
                                       input_kind="features", feature_dim=5, num_layers=2),
    "tiny-cifg-frames": ArchConfig(cell="lstm", cifg=True, peephole=True, hidden_size=8,
                                   num_classes=4, input_kind="features", feature_dim=5),
    "tiny-bilstm": ArchConfig(cell="lstm", bidirectional=True, hidden_size=8, num_classes=3,
                              input_kind="tokens", num_layers=2, vocab_size=len(TINY_VOCAB),
                              embedding_dim=6),
}  # fmt: skip
# Not in TINY_ARCHS (whose repository other suites count on): the Jordan network's tiny model.
TINY_JORDAN = ArchConfig(cell="jordan", hidden_size=8, num_classes=3, input_kind="tokens",
                         vocab_size=len(TINY_VOCAB), embedding_dim=6)  # fmt: skip


def random_model(
    arch: ArchConfig, seed: int = 0, scale: float = 0.5
) -> RecurrentClassifier | JordanClassifier:
    """A model with random weights large enough that every gate matters."""
    torch.manual_seed(seed)
    model = build_model(arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
        if arch.input_kind == "features":
            model.set_normalization(
                torch.randn(arch.feature_dim), torch.rand(arch.feature_dim) + 0.5
            )
    return model


def write_tiny_model(
    repo: Path, name: str, arch: ArchConfig, version: int = 1, seed: int = 0
) -> Path:
    """Export a random `arch` model as repo/name/version/model.onnx; returns the file."""
    model = random_model(arch, seed=seed)
    labels = [f"class{i}" for i in range(arch.num_classes)]
    tokenizer = TINY_TOKENIZER if arch.input_kind == "tokens" else None
    desc = describe(model, name, version, labels, tokenizer=tokenizer, training={"data": "random"})
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model(model, desc, str(path))
    return path


def write_tiny_repository(repo: Path) -> dict[str, Path]:
    """Every tiny architecture at version 1, plus tiny-lstm version 2 (other weights)."""
    paths = {name: write_tiny_model(repo, name, arch) for name, arch in TINY_ARCHS.items()}
    paths["tiny-lstm@2"] = write_tiny_model(repo, "tiny-lstm", TINY_ARCHS["tiny-lstm"], 2, seed=1)
    return paths
