"""K-fold cross-validation on a recipe's training split, to choose settings without the test set.

`lstm-export crossval speaker-vowels` reproduces the comparison behind the shipped recipe.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from export.arch import ArchConfig
from export.data import Example
from export.model import RecurrentClassifier
from export.train import TrainConfig, accuracy, fit, seed_everything


@dataclass(frozen=True)
class Candidate:
    name: str
    arch: dict[str, Any] = field(default_factory=dict)  # ArchConfig overrides
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides


SPEAKER_CANDIDATES: tuple[Candidate, ...] = (
    Candidate("gru-96 avg30", {"cell": "gru", "hidden_size": 96}),
    Candidate("gru-48 avg30", {"cell": "gru", "hidden_size": 48}),
    Candidate("lstm-96 avg30", {"cell": "lstm", "hidden_size": 96}),
    Candidate("lstm-128 avg30", {"cell": "lstm", "hidden_size": 128}),
    Candidate("gru-96 noise0.5", {"cell": "gru", "hidden_size": 96}, {"feature_noise": 0.5}),
    Candidate("gru-96 no-avg", {"cell": "gru", "hidden_size": 96}, {"average_last": 0}),
)


def stratified_folds(examples: list[Example], k: int, seed: int = 0) -> list[list[Example]]:
    """`k` folds with each class spread evenly, deterministically."""
    rng = random.Random(seed)
    by_label: dict[int, list[Example]] = {}
    for ex in examples:
        by_label.setdefault(ex.label, []).append(ex)
    folds: list[list[Example]] = [[] for _ in range(k)]
    for label in sorted(by_label):
        items = by_label[label][:]
        rng.shuffle(items)
        for i, ex in enumerate(items):
            folds[i % k].append(ex)
    return folds


def _fit_fold(
    arch: ArchConfig, cfg: TrainConfig, train: list[Example], held_out: list[Example]
) -> float:
    seed_everything(cfg.seed)
    model = RecurrentClassifier(arch)
    if arch.input_kind == "features":
        frames = np.concatenate([e.x for e in train])
        model.set_normalization(torch.from_numpy(frames.mean(0)), torch.from_numpy(frames.std(0)))
    fit(model, train, [], cfg)  # fixed epochs: the held-out fold is never looked at in training
    return accuracy(model, held_out)


def cross_validate(
    base_arch: ArchConfig,
    base_train: TrainConfig,
    examples: list[Example],
    candidates: tuple[Candidate, ...],
    k: int = 5,
    seeds: int = 2,
) -> list[dict[str, Any]]:
    """Mean held-out accuracy of each candidate over k folds x `seeds` seeds."""
    folds = stratified_folds(examples, k)
    rows = []
    for cand in candidates:
        arch = dataclasses.replace(base_arch, **cand.arch)
        scores = []
        for seed in range(seeds):
            for i in range(k):
                cfg = dataclasses.replace(base_train, **cand.train, seed=seed * 10 + i)
                train = [e for j, fold in enumerate(folds) if j != i for e in fold]
                scores.append(_fit_fold(arch, cfg, train, folds[i]))
        rows.append(
            {
                "candidate": cand.name,
                "cv_accuracy": round(float(np.mean(scores)), 4),
                "min": round(float(np.min(scores)), 4),
                "runs": len(scores),
            }
        )
        print(f"{cand.name:24s} {rows[-1]['cv_accuracy'] * 100:6.2f} %", flush=True)
    return rows
