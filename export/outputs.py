"""Whether a model's class outputs are what the server takes them to be (its output_kind:
probabilities, log-probabilities or logits; service/engine/byo/inferred.py), judged from values
the model computed: `lstm-export verify` fails a model whose outputs contradict their kind."""

from __future__ import annotations

import numpy as np

from lstmserve.contract import KIND_LOG_PROBS, KIND_LOGITS, KIND_PROBS


def output_kind_problem(kind: str, outputs: list[np.ndarray], half: bool = False) -> str:
    """What is wrong with taking `outputs` (..., C) as `kind`, or "": probabilities lie in
    [0, 1] and sum to 1 over the classes, log-probabilities are their logs; logits that are
    already such distributions would be flattened by a second softmax."""
    values = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outputs]).astype(np.float64)
    atol = 1e-2 if half else 1e-3
    in_unit = bool(((values >= -atol) & (values <= 1 + atol)).all())
    probs = in_unit and bool(np.allclose(values.sum(-1), 1.0, atol=atol))
    log_probs = bool((values <= atol).all()) and bool(
        np.allclose(np.exp(values).sum(-1), 1.0, atol=atol)
    )
    if kind == KIND_PROBS and not probs:
        return (
            "output_kind probs, but the outputs are not probabilities (in [0, 1], summing to 1 "
            "over the classes): set parameters output_kind logits or log_probs"
        )
    if kind == KIND_LOG_PROBS and not log_probs:
        return (
            "output_kind log_probs, but the outputs are not log-probabilities (their exp sums "
            "to 1 over the classes): set parameters output_kind logits or probs"
        )
    if kind == KIND_LOGITS and (probs or log_probs):
        right = KIND_PROBS if probs else KIND_LOG_PROBS
        return (
            f"output_kind logits, but every output seen is already a distribution ({right}): "
            f"a softmax of it would flatten the answer; set parameters output_kind {right} "
            "(or end the graph in a Softmax / LogSoftmax node)"
        )
    return ""
