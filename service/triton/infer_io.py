"""An infer request's tensors -> validated model inputs, and results -> output tensors.

Inputs of a contract-v1 model carry the batch dimension first: `tokens` INT64 [B, T],
`features` FP32 [B, T, F], or `text` BYTES [B] / [B, 1] (token models with a tokenizer). A
sequence request has B = 1. Every error is INVALID_ARGUMENT naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lstmserve.contract import OUTPUT_PROBS, OUTPUT_STEP_PROBS, ModelDescription
from service.engine.inputs import (
    check_steps,
    frames_from_rows,
    quoted,
    tokens_from_ids,
    tokens_from_text,
)
from service.engine.types import StepResult
from service.errors import InvalidInput
from service.triton.modelconfig import INPUT_TEXT, TensorNames
from service.triton.types import (
    InferInput,
    InferOutput,
    InferRequest,
    ParamValue,
    RequestedOutput,
    invalid,
)

EXPECTED_DATATYPE = {"tokens": "INT64", "features": "FP32", INPUT_TEXT: "BYTES"}


@dataclass(frozen=True)
class WantedOutput:
    """One output to answer: the client's name, ours, and the top-k of `classification`."""

    name: str
    ours: str
    classes: int  # 0: the tensor itself


def _input(request: InferRequest, names: TensorNames) -> tuple[InferInput, str]:
    """The request's one model input and which of ours it is."""
    if not request.inputs:
        raise invalid(f"the request has no input: model {request.model!r} takes {_expected(names)}")
    if len(request.inputs) > 1:
        given = [quoted(i.name) for i in request.inputs[:4]]
        raise invalid(f"the request has {len(request.inputs)} inputs {given}: send exactly one "
                      f"of {_expected(names)}")  # fmt: skip
    tensor = request.inputs[0]
    ours = names.inputs.get(tensor.name)
    if ours is None:
        raise invalid(
            f"input {quoted(tensor.name)} is not an input of model {request.model!r} "
            f"(it takes {_expected(names)})"
        )
    want = EXPECTED_DATATYPE[ours]
    if tensor.datatype != want:
        raise invalid(
            f"input {quoted(tensor.name)}: datatype {quoted(tensor.datatype)}, expected {want}"
        )
    return tensor, ours


def _expected(names: TensorNames) -> str:
    return " or ".join(repr(n) for n in names.inputs)


def decode_sequences(
    request: InferRequest, names: TensorNames, desc: ModelDescription, max_steps: int,
    max_batch: int, whole: bool,
) -> list[np.ndarray]:  # fmt: skip
    """The request's input as B sequences: (T,) int64 or (T, F) float32 each."""
    tensor, ours = _input(request, names)
    label = f"input {quoted(tensor.name)}"
    data, shape = tensor.data, tensor.shape
    if ours == INPUT_TEXT:
        if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
            raise invalid(f"{label}: shape {list(shape)}, expected [B] or [B, 1] (one text each)")
        rows = data.reshape(-1)
    else:
        rank = 2 if ours == "tokens" else 3
        if len(shape) != rank:
            dims = "[B, T]" if rank == 2 else f"[B, T, {desc.feature_dim}]"
            raise invalid(f"{label}: shape {list(shape)}, expected {dims}")
        if rank == 3 and shape[2] != desc.feature_dim:
            raise invalid(
                f"{label}: shape {list(shape)}, the last dimension must be the model's "
                f"feature_dim {desc.feature_dim}"
            )
        rows = data
    batch = shape[0]
    if batch < 1 or batch > max_batch:
        raise invalid(f"{label}: batch size {batch} is not in [1, {max_batch}]")
    try:
        return [_one(desc, ours, rows[b], max_steps, f"{label}[{b}]", whole) for b in range(batch)]
    except InvalidInput as exc:  # the engine's checks already name the row
        raise invalid(str(exc)) from exc


def _one(desc: ModelDescription, ours: str, row: object, max_steps: int, field: str,
         whole: bool) -> np.ndarray:  # fmt: skip
    if ours == INPUT_TEXT:
        raw = row if isinstance(row, bytes) else bytes(row)  # type: ignore[arg-type]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid(f"{field} is not UTF-8: {exc.reason} at byte {exc.start}") from exc
        return tokens_from_text(desc, text, max_steps, field, require_known=whole)
    array = np.asarray(row)
    check_steps(len(array), max_steps, field)
    if ours == "tokens":
        return tokens_from_ids(desc, array, max_steps, field)
    return frames_from_rows(desc, array, max_steps, field)


def wanted_outputs(request: InferRequest, names: TensorNames, classes: int) -> list[WantedOutput]:
    """The outputs to answer (every output when none was named), each checked."""
    if not request.outputs:
        return [WantedOutput(theirs, ours, 0) for theirs, ours in names.outputs.items()]
    return [_wanted(o, names, classes) for o in request.outputs]


def _wanted(output: RequestedOutput, names: TensorNames, classes: int) -> WantedOutput:
    ours = names.outputs.get(output.name)
    if ours is None:
        raise invalid(f"output {quoted(output.name)} is not an output of the model "
                      f"(it has {' and '.join(repr(n) for n in names.outputs)})")  # fmt: skip
    k = _classification(output.name, output.parameters.get("classification", 0))
    if k and ours != OUTPUT_PROBS:
        raise invalid(
            f"output {quoted(output.name)}: classification needs a [B, C] output; this one is "
            "per step ([B, T, C])"
        )
    return WantedOutput(output.name, ours, min(k, classes))


def _classification(name: str, value: ParamValue) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise invalid(
            f"output {quoted(name)}: classification = {quoted(str(value))} is not a count >= 0"
        )
    return value


def step_probs_wanted(wanted: list[WantedOutput]) -> bool:
    return any(w.ours == OUTPUT_STEP_PROBS for w in wanted)


def encode_outputs(
    wanted: list[WantedOutput], results: list[StepResult], desc: ModelDescription
) -> tuple[InferOutput, ...]:
    """The results of B sequences as output tensors (step_probs needs equal lengths)."""
    outputs = []
    for w in wanted:
        if w.ours == OUTPUT_PROBS:
            probs = np.stack([r.probs for r in results]).astype(np.float32)  # (B, C)
            if w.classes:
                labels = classification(probs, w.classes, desc.labels)  # (B, k)
                outputs.append(InferOutput(w.name, "BYTES", labels.shape, labels))
            else:
                outputs.append(InferOutput(w.name, "FP32", probs.shape, probs))
            continue
        steps = [r.step_probs for r in results]
        if any(s is None for s in steps):
            continue  # a resend's kept result has no per-step probabilities
        every = np.stack(steps).astype(np.float32)  # type: ignore[arg-type]  # (B, T, C)
        outputs.append(InferOutput(w.name, "FP32", every.shape, every))
    return tuple(outputs)


def classification(probs: np.ndarray, k: int, labels: tuple[str, ...]) -> np.ndarray:
    """(B, C) scores -> (B, k) BYTES "score:index:label", highest first (first of ties)."""
    out = np.empty((probs.shape[0], k), dtype=object)
    for b, row in enumerate(probs):
        order = np.argsort(-row, kind="stable")[:k]
        for j, i in enumerate(order):
            out[b, j] = f"{float(row[i]):f}:{int(i)}:{labels[int(i)]}".encode()
    return out
