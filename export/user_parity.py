"""A user's own module vs what we export from it: what its forward returns, and whether the
written model.onnx (onnxruntime) answers as the module does, whole and streamed in chunks.

`detect_forward` reads the user's output (last step or every step; logits, probabilities or
log-probabilities; batch- or time-major) by running it beside the mapped RecurrentClassifier;
`verify_against_user` then compares the served probabilities with the module's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from export.arch import ArchConfig
from export.model import RecurrentClassifier

TOLERANCE = 1e-5
GENERIC_PATH = (
    "export it with torch.onnx.export and write a config.pbtxt instead "
    "(docs/own-model-onnx.md; `lstm-export config MODEL.onnx` prints a starter)"
)


class VerificationError(RuntimeError):
    """The exported model does not compute what the user's module computes."""


# -- what the user's forward returns ---------------------------------------------------------

Layout = Literal["batch", "time"]
Output = Literal["logits", "probs", "log_probs"]
_OUTPUT_WORDS: dict[str, str] = {
    "logits": "logits: served probs = softmax(logits)",
    "probs": "probabilities: served as they are",
    "log_probs": "log-probabilities: served probs = exp(log_probs)",
}
_BINARY_WORDS: dict[str, str] = {
    "logits": "one logit z: served probs = [1 - sigmoid(z), sigmoid(z)]",
    "probs": "one probability p: served probs = [1 - p, p]",
    "log_probs": "one log-probability q: served probs = [1 - exp(q), exp(q)]",
}


@dataclass(frozen=True)
class Forward:
    """How the user's forward takes its input and what it returns."""

    input_layout: Layout  # x as (B, T[, F]) or (T, B[, F])
    steps: Literal["last", "every"]  # (B, C) after the last step, or one row per step
    output_layout: Layout  # for "every": (B, T, C) or (T, B, C)
    output: Output  # served probs = softmax(logits) | probs | exp(log_probs)
    with_lengths: bool = False  # forward(x, lengths): each row's length as a second argument
    binary: bool = False  # a one-output head: C = 2, the output is the second class's

    def describe(self) -> str:
        major = {"batch": "batch-major", "time": "time-major"}
        steps = (
            "the last step" if self.steps == "last" else f"every step, {major[self.output_layout]}"
        )
        how = (_BINARY_WORDS if self.binary else _OUTPUT_WORDS)[self.output]
        call = "forward(x, lengths), " if self.with_lengths else ""
        return f"{call}input {major[self.input_layout]}; output on {steps}; {how}"


def random_batch(arch: ArchConfig, gen: torch.Generator, batch: int, steps: int) -> torch.Tensor:
    """Random tokens (B, T) or features (B, T, F), batch-major."""
    if arch.input_kind == "tokens":
        return torch.randint(0, arch.vocab_size, (batch, steps), generator=gen)
    return torch.randn(batch, steps, arch.feature_dim, generator=gen)


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise VerificationError(f"forward returned {type(out).__name__}, not a tensor (or tuple)")
    return out


def takes_lengths(user: nn.Module) -> bool:
    """Whether forward has a second required argument (taken to be each row's length, as
    pack_padded_sequence wants them)."""
    try:
        params = inspect.signature(user.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    return len(required) >= 2


def call_user(
    user: nn.Module, x: torch.Tensor, layout: Layout, with_lengths: bool = False,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The user's forward on batch-major `x`, fed in `layout` (and its lengths: all T unless
    given)."""
    args = [x if layout == "batch" else x.transpose(0, 1).contiguous()]
    if with_lengths:
        full = torch.full((x.shape[0],), x.shape[1], dtype=torch.int64)
        args.append(full if lengths is None else lengths)
    with torch.no_grad():
        return _first_tensor(user(*args))


def served_probs(out: torch.Tensor, fwd: Forward) -> np.ndarray:
    """The user's output as the probabilities the server answers, batch-major."""
    if fwd.steps == "every" and fwd.output_layout == "time":
        out = out.transpose(0, 1)
    if fwd.binary:
        return _binary_probs(out, fwd)
    if fwd.output == "logits":
        out = torch.softmax(out.double(), dim=-1)
    elif fwd.output == "log_probs":
        out = torch.exp(out.double())
    return out.double().numpy()


def _binary_probs(out: torch.Tensor, fwd: Forward) -> np.ndarray:
    """A one-output head's (B[, T][, 1]) output as the two classes' probabilities."""
    z = out.double()
    if z.shape[-1] == 1 and z.dim() == (2 if fwd.steps == "last" else 3):
        z = z.squeeze(-1)
    p = {"logits": torch.sigmoid, "probs": lambda v: v, "log_probs": torch.exp}[fwd.output](z)
    return torch.stack([1.0 - p, p], dim=-1).numpy()


def _candidates(
    shape: tuple[int, ...], batch: int, steps: int, classes: int, binary: bool = False
) -> list[tuple]:
    if binary:
        classes = 1
        if shape[-1:] != (1,):
            shape = (*shape, 1)  # (B,) or (B, T): the one output squeezed
    if shape == (batch, classes):
        return [("last", "batch")]
    if shape == (batch, steps, classes):
        return [("every", "batch")]
    if shape == (steps, batch, classes):
        return [("every", "time")]
    return []


def detect_forward(
    user: nn.Module, model: RecurrentClassifier, binary: bool = False, seed: int = 0
) -> Forward:
    """Run the user's forward and the mapped model on one random batch (B=3, T=7) and pick the
    reading of the user's output that equals the mapped model's probabilities."""
    arch = model.arch
    gen = torch.Generator().manual_seed(seed)
    batch, steps = 3, 7
    x = random_batch(arch, gen, batch, steps)
    with torch.no_grad():
        step_probs, probs, _ = model.contract_forward(
            x, torch.full((batch,), steps), model.zero_state(batch)
        )
    first = parts_batch_first(user)
    lengths = takes_lengths(user)
    tried: list[str] = []
    best: tuple[float, str] = (float("inf"), "")
    for layout in ("batch", "time") if first else ("time", "batch"):
        try:
            out = call_user(user, x, layout, lengths)  # type: ignore[arg-type]
        except Exception as exc:  # the user's code: any failure means "not this layout"
            tried.append(f"{layout}-major input: forward raised {type(exc).__name__}: {exc}"[:200])
            continue
        cands = _candidates(tuple(out.shape), batch, steps, arch.num_classes, binary)
        if not cands:
            tried.append(f"{layout}-major input: output shape {tuple(out.shape)}")
        for steps_kind, out_layout in cands:
            ref = probs if steps_kind == "last" else step_probs
            for output in ("probs", "log_probs", "logits"):  # softmax(log_probs) = probs too
                fwd = Forward(layout, steps_kind, out_layout, output, lengths, binary)  # type: ignore[arg-type]
                diff = float(np.abs(served_probs(out, fwd) - ref.double().numpy()).max())
                if diff <= TOLERANCE:
                    return fwd
                best = min(best, (diff, fwd.describe()))
    if best[1]:
        tried.append(f"closest reading: {best[1]}, max abs diff {best[0]:.3g}")
    raise VerificationError(
        f"{type(user).__name__}.forward does not compute the mapped model (B={batch}, T={steps}, "
        f"C={arch.num_classes}); tried: "
        + "; ".join(tried)
        + ". The head must be applied to the last layer's output at the last step (or every "
        "step), with nothing else in between; otherwise " + GENERIC_PATH
    )


def parts_batch_first(user: nn.Module) -> bool:
    """Whether the user's first recurrent module is batch_first (the likely input layout)."""
    for module in user.modules():
        if isinstance(module, nn.RNNBase):
            return bool(module.batch_first)
    return True


# -- verifying the written file against the user's module ------------------------------------


@dataclass
class UserParity:
    """Max |user module - served model| on probabilities, whole and streamed."""

    forward: str
    whole: float = 0.0
    streamed: float | None = None
    cases: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "forward": self.forward,
            "max_diff_user_module_vs_onnxruntime": self.whole,
            "max_diff_user_module_vs_streamed_chunks": self.streamed,
            "cases": self.cases,
            "tolerance": TOLERANCE,
            "passed": self.passed,
            "failures": self.failures,
        }


class _Served:
    """onnxruntime on the written file: one call, or chunks through the state."""

    def __init__(self, path: Path) -> None:
        from export.verify import open_session
        from lstmserve.contract import read_description

        self.sess = open_session(path)
        self.desc = read_description(str(path))

    def run(
        self, x: np.ndarray, state: np.ndarray | None = None, lengths: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        batch, steps = x.shape[:2]
        if state is None:
            state = np.zeros((batch, self.desc.state_rows, self.desc.hidden_size), np.float32)
        if lengths is None:
            lengths = np.full(batch, steps, np.int64)
        feeds = {self.desc.input_name: x, "lengths": lengths, "state": state}
        return tuple(self.sess.run(None, feeds))

    def stream(self, x: np.ndarray, chunks: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Step probs (B, T, C) of all chunks and the probs after each chunk."""
        state, pos, steps, after = None, 0, [], []
        for size in chunks:
            step_probs, probs, state = self.run(x[:, pos : pos + size], state)
            steps.append(step_probs)
            after.append(probs)
            pos += size
        return np.concatenate(steps, axis=1), after


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


class _Checker:
    """Compares one case and records a failure that says what, where and how far."""

    def __init__(self, report: UserParity) -> None:
        self.report = report

    def check(self, what: str, user: np.ndarray, served: np.ndarray, streamed: bool) -> None:
        diff = _diff(user, served)
        self.report.cases += 1
        if streamed:
            self.report.streamed = max(self.report.streamed or 0.0, diff)
        else:
            self.report.whole = max(self.report.whole, diff)
        if diff > TOLERANCE:
            self.report.failures.append(f"{what}: max abs diff {diff:.3g} > {TOLERANCE}")


def verify_against_user(
    user: nn.Module, fwd: Forward, arch: ArchConfig, path: Path, seed: int = 0
) -> UserParity:
    """The written model vs the user's module on random inputs: batch 3, lengths 1, 2, 5, 16,
    whole, and (streamable models) in chunks whose state is passed on, each chunk's answer
    compared with the module run on the sequence so far."""
    served = _Served(path)
    report = UserParity(forward=fwd.describe())
    check = _Checker(report).check
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    out_name = "probs" if fwd.steps == "last" else "step_probs"
    for steps in (1, 2, 5, 16):
        x = random_batch(arch, gen, 3, steps)
        user_probs = served_probs(call_user(user, x, fwd.input_layout, fwd.with_lengths), fwd)
        whole = served.run(x.numpy())
        check(f"{out_name} at length {steps} (B=3, one call)", user_probs,
              whole[1] if fwd.steps == "last" else whole[0], streamed=False)  # fmt: skip
        if not arch.streamable or steps < 2:
            continue
        from export.verify import random_chunks

        for chunks in ([1] * steps, random_chunks(rng, steps)):
            step_probs, after = served.stream(x.numpy(), chunks)
            where = f"at length {steps} streamed in chunks {chunks}"
            if fwd.steps == "every":
                check(f"step_probs {where}", user_probs, step_probs, streamed=True)
                continue
            pos = 0
            for size, probs in zip(chunks, after, strict=True):
                pos += size
                out = call_user(user, x[:, :pos], fwd.input_layout, fwd.with_lengths)
                prefix = served_probs(out, fwd)
                check(f"probs after {pos} steps {where}", prefix, probs, streamed=True)
    if fwd.with_lengths:
        _check_mixed_lengths(user, fwd, arch, served, check, gen)
    return report


def _check_mixed_lengths(
    user: nn.Module, fwd: Forward, arch: ArchConfig, served: _Served,
    check: Callable[..., None], gen: torch.Generator,
) -> None:  # fmt: skip
    """forward(x, lengths) on a padded batch of mixed lengths vs the served model given the same
    lengths (only each row's valid steps compared)."""
    lengths = torch.tensor([16, 3, 9])
    x = random_batch(arch, gen, 3, 16)
    out = served_probs(call_user(user, x, fwd.input_layout, True, lengths), fwd)
    whole = served.run(x.numpy(), lengths=lengths.numpy())
    what = f"lengths {lengths.tolist()} in one padded batch (each row ends at its length)"
    if fwd.steps == "last":
        check(f"probs at {what}", out, whole[1], streamed=False)
        return
    valid = np.arange(16)[None, :] < lengths.numpy()[:, None]  # (B, T)
    check(f"step_probs at {what}", out[valid], whole[0][valid], streamed=False)
