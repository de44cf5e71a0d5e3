"""One training loop for every recurrent classifier: Adam, gradient-norm clipping, validation
early stopping, fixed seeds, a progress bar and a JSON-ready report."""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from export.data import Example
from export.model import RecurrentClassifier


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 60
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    patience: int = 12
    seed: int = 0
    # Loss = step_weight * mean CE over every valid step + (1 - step_weight) * CE at the last step:
    # the per-step answer ("the classification so far") is what the service streams.
    step_weight: float = 0.5
    # Gaussian noise added to normalised frames while training (feature models only).
    feature_noise: float = 0.0
    # Probability of training on a random contiguous window (at least half) of a sequence.
    random_crop: float = 0.0
    lr_decay: float = 1.0  # multiply lr by this after every epoch
    # Without validation (fixed epochs): average the weights of the last N epochs (SWA), which
    # steadies a small data set's noisy optimisation; 0 keeps the final weights.
    average_last: int = 0
    threads: int = 2


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad a list of examples -> x (B, T[, F]), lengths (B,), labels (B,)."""
    lengths = torch.tensor([len(e.x) for e in examples], dtype=torch.int64)
    t_max = int(lengths.max())
    first = examples[0].x
    x = np.zeros((len(examples), t_max, *first.shape[1:]), dtype=first.dtype)
    for row, e in enumerate(examples):
        x[row, : len(e.x)] = e.x
    labels = torch.tensor([e.label for e in examples], dtype=torch.int64)
    return torch.from_numpy(x), lengths, labels


def batches(examples: list[Example], size: int, rng: random.Random | None) -> Iterator[list]:
    """Length-bucketed batches (little padding), shuffled when `rng` is given."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].x))
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    if rng is not None:
        rng.shuffle(chunks)
    for chunk in chunks:
        yield [examples[i] for i in chunk]


def sequence_loss(
    logits: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor, step_weight: float
) -> torch.Tensor:
    """Cross-entropy at every valid step and at the last step, mixed by `step_weight`."""
    bsz, t_max, n_cls = logits.shape
    mask = torch.arange(t_max).unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
    per_step = F.cross_entropy(
        logits.reshape(-1, n_cls), labels.repeat_interleave(t_max), reduction="none"
    ).view(bsz, t_max)
    step_loss = (per_step * mask).sum(1) / lengths  # (B,)
    last_loss = per_step.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)  # (B,)
    return (step_weight * step_loss + (1 - step_weight) * last_loss).mean()


@torch.no_grad()
def predict(model: RecurrentClassifier, examples: list[Example], batch_size: int = 256) -> dict:
    """Per-example last-step prediction and per-step predictions (for accuracy by prefix)."""
    model.eval()
    last, steps, labels = [], [], []
    for batch in batches(examples, batch_size, None):
        x, lengths, y = collate(batch)
        logits, _ = model.step_logits(x, lengths)
        pred = logits.argmax(-1)  # (B, T)
        last += pred.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1).tolist()
        steps += [pred[i, : lengths[i]].tolist() for i in range(len(batch))]
        labels += y.tolist()
    return {"last": np.array(last), "steps": steps, "labels": np.array(labels)}


def accuracy(model: RecurrentClassifier, examples: list[Example]) -> float:
    p = predict(model, examples)
    return float((p["last"] == p["labels"]).mean())


@torch.no_grad()
def evaluate(
    model: RecurrentClassifier, examples: list[Example], step_weight: float
) -> tuple[float, float]:
    """(loss, last-step accuracy) on `examples`."""
    model.eval()
    total, correct = 0.0, 0
    for batch in batches(examples, 256, None):
        x, lengths, y = collate(batch)
        logits, _ = model.step_logits(x, lengths)
        total += float(sequence_loss(logits, lengths, y, step_weight)) * len(batch)
        last = logits.gather(1, (lengths - 1).view(-1, 1, 1).expand(-1, 1, logits.shape[-1]))
        correct += int((last.squeeze(1).argmax(-1) == y).sum())
    return total / len(examples), correct / len(examples)


def _crop(batch: list[Example], p: float, rng: random.Random) -> list[Example]:
    """Random contiguous windows of at least half of each sequence (data augmentation)."""
    if p <= 0:
        return batch
    out = []
    for e in batch:
        n = len(e.x)
        if n >= 4 and rng.random() < p:
            keep = rng.randint((n + 1) // 2, n)
            start = rng.randint(0, n - keep)
            e = Example(e.x[start : start + keep], e.label)
        out.append(e)
    return out


def _noisy(x: torch.Tensor, model: RecurrentClassifier, scale: float) -> torch.Tensor:
    """Add noise of `scale` normalised units to raw frames (the model normalises inside)."""
    if scale <= 0 or x.dtype != torch.float32:
        return x
    return x + torch.randn_like(x) * scale * model.feature_std


def _train_epoch(
    model: RecurrentClassifier,
    train: list[Example],
    cfg: TrainConfig,
    opt: torch.optim.Optimizer,
    rng: random.Random,
    epoch: int,
) -> float:
    """One pass over `train`; returns the mean training loss."""
    model.train()
    total, seen = 0.0, 0
    n_batches = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    bar = tqdm(batches(train, cfg.batch_size, rng), total=n_batches, desc=f"epoch {epoch}",
               leave=False, mininterval=1.0)  # fmt: skip
    for batch in bar:
        x, lengths, y = collate(_crop(batch, cfg.random_crop, rng))
        logits, _ = model.step_logits(_noisy(x, model, cfg.feature_noise), lengths)
        loss = sequence_loss(logits, lengths, y, cfg.step_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        opt.step()
        total += float(loss.detach()) * len(batch)
        seen += len(batch)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return total / seen


def fit(
    model: RecurrentClassifier, train: list[Example], val: list[Example], cfg: TrainConfig
) -> dict[str, Any]:
    """Train with early stopping on validation loss and restore the best weights; with no
    validation examples, train for exactly `cfg.epochs` and keep the final weights."""
    seed_everything(cfg.seed)
    torch.set_num_threads(cfg.threads)
    rng = random.Random(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    best: dict[str, Any] = {"val_accuracy": None, "epoch": cfg.epochs, "val_loss": None}
    best_state = None
    history, started, stale = [], time.time(), 0
    averaged = torch.optim.swa_utils.AveragedModel(model) if cfg.average_last and not val else None
    for epoch in range(1, cfg.epochs + 1):
        train_loss = _train_epoch(model, train, cfg, opt, rng, epoch)
        sched.step()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": round(train_loss, 5)}
        history.append(record)
        if not val:
            tqdm.write(f"epoch {epoch:3d}  train loss {train_loss:.4f}")
            if averaged is not None and epoch > cfg.epochs - cfg.average_last:
                averaged.update_parameters(model)
            continue
        val_loss, val_acc = evaluate(model, val, cfg.step_weight)
        record |= {"val_loss": round(val_loss, 5), "val_accuracy": val_acc}
        tqdm.write(f"epoch {epoch:3d}  train loss {train_loss:.4f}  val loss {val_loss:.4f}"
                   f"  val acc {val_acc:.4f}")  # fmt: skip
        if best["val_loss"] is None or val_loss < best["val_loss"]:
            best = {"val_accuracy": val_acc, "epoch": epoch, "val_loss": round(val_loss, 5)}
            best_state = copy.deepcopy(model.state_dict())
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                tqdm.write(f"early stop: no val improvement for {cfg.patience} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    if averaged is not None:
        with torch.no_grad():
            for mine, avg in zip(model.parameters(), averaged.module.parameters(), strict=True):
                mine.copy_(avg)
    model.eval()
    return {
        "config": asdict(cfg),
        "early_stopping": bool(val),
        "best_epoch": best["epoch"],
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "epochs_run": len(history),
        "seconds": round(time.time() - started, 1),
        "history": history,
    }
