"""The written form of an early decision rule, shared by `lstm-client stream --decide-at` and
the Triton request parameter `lstm_serve_decide_at`.

    P[,N]          the top label's probability >= P for N consecutive steps (N defaults to 1)
    margin:M[,N]   the top label beats the second by >= M for N consecutive steps

P and M are in (0, 1]; N is a whole number >= 1. The wire form is `DecisionRule`
(proto/lstmserve/v1/lstm_serve.proto).
"""

from __future__ import annotations

import math

MARGIN = "margin:"


def parse_decide_at(spec: str) -> tuple[float, float, int]:
    """'0.9', '0.9,3', 'margin:0.5,2' -> (probability, margin, steps); ValueError saying what
    is wrong otherwise."""
    text = spec.strip()
    margin = text.startswith(MARGIN)
    if margin:
        text = text[len(MARGIN) :]
    value, _, count = text.partition(",")
    try:
        threshold = float(value)
        steps = int(count) if count.strip() else 1
    except ValueError:
        raise ValueError(f"{spec!r} is not P[,N] or margin:M[,N]") from None
    if not (0 < threshold <= 1 and math.isfinite(threshold)):
        raise ValueError(f"{spec!r}: {'M' if margin else 'P'} = {value.strip()} is not in (0, 1]")
    if steps < 1:
        raise ValueError(f"{spec!r}: N = {steps} is not a whole number >= 1")
    return (0.0, threshold, steps) if margin else (threshold, 0.0, steps)
