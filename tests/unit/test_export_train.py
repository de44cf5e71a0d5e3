"""The training loop learns, clips, stops early and restores its best weights."""

from __future__ import annotations

import numpy as np
import torch

from export.arch import ArchConfig
from export.data import Example
from export.model import RecurrentClassifier
from export.train import TrainConfig, accuracy, collate, fit, sequence_loss


def _toy(n: int, seed: int) -> list[Example]:
    """Label = which of two token ids dominates the sequence: learnable by any cell."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        length = int(rng.integers(3, 9))
        ids = rng.choice([1 + label] * 3 + [3], size=length)
        out.append(Example(ids.astype(np.int64), label))
    return out


def test_fit_learns_a_toy_task_and_reports() -> None:
    arch = ArchConfig(cell="gru", hidden_size=8, num_classes=2, input_kind="tokens",
                      vocab_size=4, embedding_dim=4)  # fmt: skip
    model = RecurrentClassifier(arch)
    report = fit(model, _toy(200, 0), _toy(50, 1), TrainConfig(epochs=6, patience=3, lr=1e-2))
    assert accuracy(model, _toy(100, 2)) > 0.9
    assert 1 <= report["best_epoch"] <= report["epochs_run"] <= 6
    assert report["history"][0]["train_loss"] > report["history"][-1]["train_loss"]
    assert not model.training, "fit leaves the model in eval mode"


def test_sequence_loss_ignores_padding() -> None:
    logits = torch.randn(2, 5, 3)
    lengths = torch.tensor([2, 5])
    labels = torch.tensor([0, 2])
    changed = logits.clone()
    changed[0, 2:] = 100.0  # padding of row 0
    for w in (0.0, 0.5, 1.0):
        assert torch.allclose(
            sequence_loss(logits, lengths, labels, w), sequence_loss(changed, lengths, labels, w)
        )


def test_collate_pads_frames_and_tokens() -> None:
    x, lengths, labels = collate([Example(np.ones((2, 3), np.float32), 1),
                                  Example(np.ones((4, 3), np.float32), 0)])  # fmt: skip
    assert x.shape == (2, 4, 3) and lengths.tolist() == [2, 4] and labels.tolist() == [1, 0]
    assert float(x[0, 2:].abs().sum()) == 0.0
