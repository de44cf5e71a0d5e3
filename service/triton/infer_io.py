"""An infer request's tensors -> validated model inputs, and results -> output tensors.

Inputs of a contract-v1 model carry the batch dimension first: `tokens` INT64 [B, T],
`features` FP32 [B, T, F], or `text` BYTES [B] / [B, 1] (token models with a tokenizer). A
sequence request has B = 1. Every error is INVALID_ARGUMENT naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lstmserve.contract import INPUT_LENGTHS, OUTPUT_PROBS, OUTPUT_STEP_PROBS, ModelDescription
from service.engine.text.inputs import (
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


@dataclass(frozen=True)
class WantedOutput:
    """One output to answer: the client's name, ours, and the top-k of `classification`."""

    name: str
    ours: str
    classes: int  # 0: the tensor itself


def _inputs(request: InferRequest, names: TensorNames) -> tuple[InferInput, str, InferInput | None]:
    """The request's data input, which of ours it is, and its lengths input (if the model
    lists one); each checked against the model's names and datatypes."""
    if not request.inputs:
        raise invalid(f"the request has no input: model {request.model!r} takes {_expected(names)}")
    data: list[tuple[InferInput, str]] = []
    lengths = None
    for tensor in request.inputs:
        ours = names.inputs.get(tensor.name)
        if ours is None:
            raise invalid(
                f"input {quoted(tensor.name)} is not an input of model {request.model!r} "
                f"(it takes {_expected(names)})"
            )
        want = names.datatypes[tensor.name]
        if tensor.datatype != want:
            raise invalid(
                f"input {quoted(tensor.name)}: datatype {quoted(tensor.datatype)}, expected {want}"
            )
        if ours == INPUT_LENGTHS:
            lengths = tensor
        else:
            data.append((tensor, ours))
    if len(data) != 1:
        given = [t.name for t, _ in data]
        raise invalid(f"the request has data inputs {given}: send exactly one of "
                      f"{_expected(names)}")  # fmt: skip
    return data[0][0], data[0][1], lengths


def _expected(names: TensorNames) -> str:
    return " or ".join(repr(n) for n, ours in names.inputs.items() if ours != INPUT_LENGTHS)


def decode_sequences(
    request: InferRequest, names: TensorNames, desc: ModelDescription, max_steps: int,
    max_batch: int,
) -> list[np.ndarray]:  # fmt: skip
    """The request's input as B whole sequences: (T,) int64 or (T, F) float32 each."""
    return _decode(request, names, desc, max_steps, max_batch, whole=True)  # type: ignore[return-value]


class SequenceChunk:
    """A sequence request's one chunk for one model version, as the session layer decodes
    inputs (service/protocol/messages.py InputSource): its steps, or its text (tokenized by the
    layer against the text the sequence holds back). Checked when built."""

    def __init__(self, request: InferRequest, names: TensorNames, desc: ModelDescription,
                 max_steps: int, every_step: bool) -> None:  # fmt: skip
        (self._chunk,) = _decode(request, names, desc, max_steps, 1, whole=False)
        self.every_step = every_step
        # One input: the data input (_decode checked it); else find it among the inputs.
        tensor = request.inputs[0] if len(request.inputs) == 1 else _inputs(request, names)[0]
        self.label = f"input {quoted(tensor.name)}"

    def decode(self, desc: ModelDescription, max_steps: int, field: str) -> np.ndarray:
        assert not isinstance(self._chunk, str)
        return self._chunk

    def text(self) -> str | None:
        return self._chunk if isinstance(self._chunk, str) else None

    def steps_hint(self) -> int:
        return len(self._chunk)

    def nbytes(self) -> int:
        chunk = self._chunk
        if isinstance(chunk, str):
            return len(chunk.encode("utf-8", "surrogatepass"))
        return chunk.nbytes


def _decode(
    request: InferRequest, names: TensorNames, desc: ModelDescription, max_steps: int,
    max_batch: int, whole: bool,
) -> list[np.ndarray | str]:  # fmt: skip
    tensor, ours, lengths_input = _inputs(request, names)
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
        if max_batch == 1 and batch > 1:  # as Triton's sequence batcher requires
            raise invalid(f"{label}: shape {list(shape)}: a sequence request must have batch "
                          "size 1 (one chunk of its sequence)")  # fmt: skip
        raise invalid(f"{label}: batch size {batch} is not in [1, {max_batch}]")
    valid = _lengths(lengths_input, batch, shape, ours) if lengths_input is not None else None
    try:
        return [
            _one(desc, ours, rows[b] if valid is None else rows[b][: valid[b]], max_steps,
                 f"{label}[{b}]", whole)
            for b in range(batch)
        ]  # fmt: skip
    except InvalidInput as exc:  # the engine's checks already name the row
        raise invalid(str(exc)) from exc


def _lengths(tensor: InferInput, batch: int, shape: tuple[int, ...], ours: str) -> list[int]:
    """A lengths input: one count of valid steps per row, each in 1..T."""
    label = f"input {quoted(tensor.name)}"
    if ours == INPUT_TEXT:
        raise invalid(f"{label}: a text input carries its own length")
    values = np.asarray(tensor.data).reshape(-1)
    if values.size != batch or tensor.shape not in ((batch,), (batch, 1)):
        raise invalid(f"{label}: shape {list(tensor.shape)}, expected [{batch}] or [{batch}, 1]")
    steps = shape[1]
    for b, n in enumerate(values.tolist()):
        if not 1 <= n <= steps:
            raise invalid(f"{label}[{b}] = {n} is not in [1, {steps}]")
    return [int(n) for n in values]


def _one(desc: ModelDescription, ours: str, row: object, max_steps: int, field: str,
         whole: bool) -> np.ndarray | str:  # fmt: skip
    if ours == INPUT_TEXT:
        raw = row if isinstance(row, bytes) else bytes(row)  # type: ignore[arg-type]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise invalid(f"{field} is not UTF-8: {exc.reason} at byte {exc.start}") from exc
        return tokens_from_text(desc, text, max_steps, field) if whole else text
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
    """The results of B sequences as output tensors, each output as the model computed it
    (what Triton returns: a config.pbtxt model's logits stay logits); per-step outputs of
    shorter rows padded with 0."""
    outputs = []
    for w in wanted:
        if w.ours == OUTPUT_PROBS:
            values = np.zeros((len(results), desc.num_classes), np.float32)  # (B, C)
            for b, r in enumerate(results):  # none yet (all text held back so far): zeros
                if r.values.size:
                    values[b] = r.values
            if w.classes:
                labels = classification(values, w.classes, desc.labels)  # (B, k)
                outputs.append(InferOutput(w.name, "BYTES", labels.shape, labels))
            else:
                outputs.append(InferOutput(w.name, "FP32", values.shape, values))
            continue
        none = np.zeros((0, desc.num_classes), np.float32)  # a chunk all held back: no step
        steps = [none if r.steps == 0 and r.step_values is None else r.step_values
                 for r in results]  # fmt: skip
        if any(s is None for s in steps):
            continue  # a resend's kept result has no per-step probabilities
        longest = max(len(s) for s in steps)  # type: ignore[arg-type]
        every = np.zeros((len(steps), longest, desc.num_classes), np.float32)  # (B, T, C)
        for b, rows in enumerate(steps):  # a shorter row (lengths, texts) is padded with 0
            every[b, : len(rows)] = rows  # type: ignore[arg-type]
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
