"""A config.pbtxt checked against its ONNX graph: which tensor is what, with which shapes.

Every graph input must be accounted for (the data input, lengths, a state, a control input), and
every tensor the config names must be in the graph with the config's type and a shape that
agrees; a disagreement is refused at load, naming the tensor and both shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lstmserve.contract import DESCRIPTION_KEY, DescriptionError, ModelDescription, Tokenizer
from service.engine.byo.inferred import configured_kind, embedding_rows, output_kind
from service.engine.byo.onnxgraph import OnnxFormatError, OnnxGraph, read_graph
from service.engine.byo.tritonconfig import (
    ControlSpec,
    StateSpec,
    TensorSpec,
    TritonModel,
    read_vocabulary,
)
from service.errors import ConfigError

ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
    "tensor(uint64)": np.dtype(np.uint64),
    "tensor(uint32)": np.dtype(np.uint32),
}
FLOATS = (np.dtype(np.float32), np.dtype(np.float16))
INTS = (np.dtype(np.int64), np.dtype(np.int32))
Shape = tuple[int | None, ...]  # an ONNX shape: None where the dimension is symbolic


def onnx_shape(arg: ort.NodeArg) -> Shape:
    return tuple(d if isinstance(d, int) and d > 0 else None for d in arg.shape)


def fmt(shape: Shape | tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if d is None or d < 0 else str(d) for d in shape) + "]"


def check_shape(what: str, config: tuple[int, ...], graph: Shape, path: Path) -> Shape:
    """A config shape (-1 = any) against the graph's (None = symbolic); the two merged."""
    if len(config) != len(graph) or any(
        c > 0 and g is not None and c != g for c, g in zip(config, graph, strict=True)
    ):
        raise ConfigError(
            f"{path}: {what} is {fmt(config)} in config.pbtxt but {fmt(graph)} in the ONNX file"
        )
    return tuple(c if c > 0 else g for c, g in zip(config, graph, strict=True))


@dataclass(frozen=True)
class BoundState:
    """A state tensor as the graph takes it: its per-session shape and where the batch goes."""

    spec: StateSpec
    shape: tuple[int, ...]  # per session, without the batch axis
    batch_axis: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Binding:
    """The roles of a generic model's graph tensors."""

    data: TensorSpec  # tokens (B, T) or features (B, T, F), with the graph's dtype
    input_kind: str
    feature_dim: int
    vocab_size: int
    window: int | None  # a fixed time dimension, else None
    lengths: TensorSpec | None
    lengths_tail: tuple[int, ...]  # () for [B], (1,) for [B, 1]
    step_output: TensorSpec | None  # (B, T, C)
    final_output: TensorSpec | None  # (B, C)
    states: tuple[BoundState, ...]
    controls: tuple[tuple[ControlSpec, tuple[int, ...]], ...]  # with the shape after B
    labels: tuple[str, ...]
    tokenizer: Tokenizer | None
    output_kind: str  # lstmserve.contract OUTPUT_KINDS
    output_kind_rule: str  # why (service/engine/byo/inferred.py)
    vocab_rule: str  # where vocab_size came from ("" for features)

    def control_feeds(self, fresh: np.ndarray, corrid: np.ndarray) -> dict[str, np.ndarray]:
        """START where a row's sequence starts (its state is the zero initial state), READY
        always, END never (a stream's end carries no chunk); CORRID the row's session's id."""
        feeds = {}
        for spec, tail in self.controls:
            if spec.kind == "CORRID":
                bits = np.iinfo(spec.dtype).bits - (1 if np.iinfo(spec.dtype).min < 0 else 0)
                mask = np.uint64((1 << bits) - 1)
                values = (corrid & mask).astype(spec.dtype)
            else:
                on = {"START": fresh, "READY": np.ones_like(fresh), "END": np.zeros_like(fresh)}
                values = np.where(on[spec.kind], spec.false_true[1], spec.false_true[0])
            feeds[spec.name] = values.astype(spec.dtype).reshape(-1, *tail)
        return feeds

    def describe(self, name: str, version: int, rows: int, hidden: int,
                 row_names: tuple[str, ...]) -> ModelDescription:  # fmt: skip
        outputs = [o.name for o in (self.step_output, self.final_output) if o is not None]
        return ModelDescription(
            name=name, version=version, labels=self.labels, input_kind=self.input_kind,
            state_rows=rows, hidden_size=hidden, state_row_names=row_names, streamable=True,
            architecture={
                "source": "config.pbtxt",
                "states": {s.spec.input_name: list(s.shape) for s in self.states},
                "outputs": outputs,
                "lengths_input": self.lengths.name if self.lengths else None,
                "fixed_steps": self.window,
                **({"vocab_size_from": self.vocab_rule} if self.vocab_rule else {}),
            },
            vocab_size=self.vocab_size, feature_dim=self.feature_dim, tokenizer=self.tokenizer,
            output_kind=self.output_kind, output_kind_rule=self.output_kind_rule,
        )  # fmt: skip


def bind(triton: TritonModel, session: ort.InferenceSession, model_path: Path) -> Binding:
    """Check the config against the graph; ConfigError naming the tensor otherwise. A file
    that also carries our description (an lstm-export model with a config.pbtxt beside it)
    gives the labels, vocabulary and tokenizer the config does not."""
    path = triton.path
    graph_in = {a.name: a for a in session.get_inputs()}
    graph_out = {a.name: a for a in session.get_outputs()}
    batched = triton.max_batch_size > 0
    lengths_name = triton.parameters.get("lengths_input") or (
        "lengths" if any(t.name == "lengths" for t in triton.inputs) else ""
    )
    data_inputs = [t for t in triton.inputs if t.name != lengths_name]
    if len(data_inputs) != 1:
        raise ConfigError(
            f"{path}: input lists {[t.name for t in data_inputs]}: a model takes one data "
            "input (tokens or features) besides its lengths input, states and controls"
        )
    bound_in = {t.name: _bind_tensor(t, graph_in, batched, path, "input") for t in triton.inputs}
    data, shape = bound_in[data_inputs[0].name]
    kind, feature_dim = _data_kind(data, shape, path)
    lengths, lengths_tail = None, ()
    if lengths_name:
        if lengths_name not in bound_in:
            raise ConfigError(f"{path}: parameters lengths_input {lengths_name!r} is not an input")
        lengths, lshape = bound_in[lengths_name]
        if lengths.dtype not in INTS or len(lshape) not in (1, 2) or lshape[1:] not in ((), (1,)):
            raise ConfigError(f"{path}: input {lengths_name!r} must be int [B] or [B, 1]")
        lengths_tail = tuple(1 for _ in lshape[1:])
    states = tuple(_bind_state(s, graph_in, graph_out, triton, path) for s in triton.states)
    controls = tuple(_bind_control(c, graph_in, path) for c in triton.controls)
    known = set(bound_in) | {s.spec.input_name for s in states} | {c.name for c, _ in controls}
    for name in graph_in:
        if name not in known:
            raise ConfigError(
                f"{path}: the ONNX input {name!r} is neither an input, a sequence_batching.state "
                "input_name nor a control_input of config.pbtxt"
            )
    step, final, classes = _bind_outputs(triton, graph_out, batched, path)
    meaning = _meaning(triton, session, model_path, data if kind == "tokens" else None,
                       [o for o in (step, final) if o is not None], classes)  # fmt: skip
    return Binding(
        data=data, input_kind=kind, feature_dim=feature_dim, window=shape[1], lengths=lengths,
        lengths_tail=lengths_tail, step_output=step, final_output=final, states=states,
        controls=controls, **meaning,
    )  # fmt: skip


def _meaning(triton: TritonModel, session: ort.InferenceSession, model_path: Path,
             tokens: TensorSpec | None, outputs: list[TensorSpec],
             classes: int) -> dict[str, Any]:  # fmt: skip
    """Labels, vocabulary size, tokenizer and output kind: from config.pbtxt, else our own
    description in the file (an lstm-export model), else the graph (service/engine/byo/
    inferred.py), each with the rule that gave it."""
    own = _own_description(session)
    graph, unread = _graph(model_path)
    labels = _labels(triton, outputs, classes)
    if own is not None and not any(o.label_filename for o in outputs):
        labels = own.labels if own.num_classes == classes else labels
    vocab, vocab_rule, tokenizer = 0, "", None
    if tokens is not None and own is not None and "vocab_size" not in triton.parameters:
        vocab, vocab_rule = own.vocab_size, "the lstm-serve description in the file"
    elif tokens is not None:
        vocab, vocab_rule = _vocab_size(triton, tokens, graph, unread)
    if tokens is not None:
        tokenizer = _tokenizer(triton, vocab) or (own.tokenizer if own is not None else None)
    kind, kind_rule = _output_kind(triton, graph, unread, outputs, own)
    return {"labels": labels, "vocab_size": vocab, "vocab_rule": vocab_rule,
            "tokenizer": tokenizer, "output_kind": kind, "output_kind_rule": kind_rule}  # fmt: skip


def _graph(model_path: Path) -> tuple[OnnxGraph | None, str]:
    """The file's graph, or None and why it could not be read."""
    try:
        return read_graph(model_path), ""
    except (OSError, OnnxFormatError) as exc:
        return None, f"the graph of {model_path.name} could not be read ({exc})"


def _output_kind(triton: TritonModel, graph: OnnxGraph | None, unread: str,
                 outputs: list[TensorSpec],
                 own: ModelDescription | None) -> tuple[str, str]:  # fmt: skip
    """parameters output_kind, else our own description's, else what the graph's tails say;
    class outputs whose tails disagree need the parameter."""
    if triton.output_kind is not None:
        return configured_kind(triton.output_kind)
    if own is not None:
        return own.output_kind, f"the lstm-serve description in the file: {own.output_kind_rule}"
    if graph is None:  # never a guess: the config must say
        raise ConfigError(f"{triton.path}: {unread}: set parameters output_kind")
    batched = 1 if triton.max_batch_size > 0 else 0
    found = [output_kind(graph, o.name, len(o.graph_dims) + batched) for o in outputs]
    if len({kind for kind, _ in found}) > 1:
        raise ConfigError(
            f"{triton.path}: the class outputs are of different kinds: "
            f"{'; '.join(rule for _, rule in found)}: set parameters output_kind"
        )
    return found[0][0], "; ".join(rule for _, rule in found)


def _bind_tensor(t: TensorSpec, graph: dict[str, ort.NodeArg], batched: bool, path: Path,
                 kind: str) -> tuple[TensorSpec, Shape]:  # fmt: skip
    """The tensor with the graph's dtype and its merged full shape (batch first)."""
    if t.name not in graph:
        raise ConfigError(f"{path}: {kind} {t.name!r} is not a graph {kind} of the ONNX file "
                          f"(it has {sorted(graph)})")  # fmt: skip
    arg = graph[t.name]
    dtype = ORT_DTYPES.get(arg.type)
    if dtype != t.dtype:
        raise ConfigError(f"{path}: {kind} {t.name!r} is {t.dtype} in config.pbtxt but "
                          f"{arg.type} in the ONNX file")  # fmt: skip
    dims = (-1, *t.graph_dims) if batched else t.graph_dims
    shape = check_shape(f"{kind} {t.name!r}", dims, onnx_shape(arg), path)
    if shape and shape[0] is not None:
        raise ConfigError(
            f"{path}: {kind} {t.name!r} has a fixed batch dimension {shape[0]} in the ONNX file: "
            "export it with a dynamic batch axis (the server batches sessions together)"
        )
    return t, shape


def _data_kind(data: TensorSpec, shape: Shape, path: Path) -> tuple[str, int]:
    if data.dtype in INTS and len(shape) == 2:
        return "tokens", 0
    if data.dtype in FLOATS and len(shape) == 3:
        if shape[2] is None:
            raise ConfigError(f"{path}: input {data.name!r} needs a fixed feature dimension")
        return "features", int(shape[2])
    raise ConfigError(
        f"{path}: input {data.name!r} must be int tokens [B, T] or float features [B, T, F] "
        f"(with the batch), not {data.dtype} {fmt(shape)}"
    )


def _bind_state(s: StateSpec, graph_in: dict[str, ort.NodeArg],
                graph_out: dict[str, ort.NodeArg], triton: TritonModel,
                path: Path) -> BoundState:  # fmt: skip
    what = f"sequence_batching.state {s.input_name!r}"
    for name, graph, kind in ((s.input_name, graph_in, "input"),
                              (s.output_name, graph_out, "output")):  # fmt: skip
        if name not in graph:
            raise ConfigError(f"{path}: {what}: {name!r} is not a graph {kind} of the ONNX file")
        if ORT_DTYPES.get(graph[name].type) != s.dtype:
            raise ConfigError(f"{path}: {what} is {s.dtype} in config.pbtxt but {name!r} is "
                              f"{graph[name].type} in the ONNX file")  # fmt: skip
    gin, gout = onnx_shape(graph_in[s.input_name]), onnx_shape(graph_out[s.output_name])
    axis = _batch_axis(s, gin, triton, path)
    dims = list(s.dims)
    per_session_dims = triton.max_batch_size > 0 or "state_batch_axis" in triton.parameters
    if per_session_dims and len(dims) == len(gin) - 1:
        dims.insert(axis, -1)  # the config leaves the batch axis out
    if len(dims) != len(gin) or not 0 <= axis < len(gin):
        raise ConfigError(f"{path}: {what} dims {fmt(s.dims)} do not fit the ONNX input "
                          f"{s.input_name!r} {fmt(gin)} with the batch on axis {axis}")  # fmt: skip
    merged = check_shape(what, tuple(dims), gin, path)
    if merged[axis] is not None:
        raise ConfigError(
            f"{path}: {what} has a fixed batch dimension {merged[axis]} (axis {axis}) in the "
            "ONNX file: export it with a dynamic batch axis (the server batches sessions)"
        )
    check_shape(f"{what} (its output {s.output_name!r})", tuple(dims), gout, path)
    per_session = merged[:axis] + merged[axis + 1 :]
    if any(d is None for d in per_session):
        raise ConfigError(f"{path}: {what} needs fixed dims besides the batch axis, has "
                          f"{fmt(merged)}")  # fmt: skip
    return BoundState(s, tuple(int(d) for d in per_session if d is not None), axis)


def _batch_axis(s: StateSpec, graph: Shape, triton: TritonModel, path: Path) -> int:
    """parameters state_batch_axis, else 0 with max_batch_size > 0 (Triton's rule), else the
    one symbolic dimension of the ONNX state input."""
    if "state_batch_axis" in triton.parameters:
        raw = triton.parameters["state_batch_axis"]
        if not raw.strip().isdigit():
            raise ConfigError(f"{path}: parameters state_batch_axis {raw[:64]!r} is not an axis")
        return int(raw)
    if triton.max_batch_size > 0:
        return 0
    symbolic = [i for i, d in enumerate(graph) if d is None]
    if len(symbolic) != 1:
        raise ConfigError(
            f"{path}: sequence_batching.state {s.input_name!r}: the batch axis is not known "
            f"(ONNX shape {fmt(graph)}): set max_batch_size > 0 (batch first) or parameters "
            "state_batch_axis"
        )
    return symbolic[0]


def _bind_control(c: ControlSpec, graph: dict[str, ort.NodeArg],
                  path: Path) -> tuple[ControlSpec, tuple[int, ...]]:  # fmt: skip
    if c.name not in graph:
        raise ConfigError(f"{path}: control_input {c.name!r} is not a graph input of the ONNX file")
    dtype = ORT_DTYPES.get(graph[c.name].type)
    if dtype is None or (c.kind == "CORRID" and dtype != c.dtype):
        raise ConfigError(f"{path}: control_input {c.name!r} is {c.dtype} in config.pbtxt but "
                          f"{graph[c.name].type} in the ONNX file")  # fmt: skip
    shape = onnx_shape(graph[c.name])
    if len(shape) not in (1, 2) or shape[1:] not in ((), (1,), (None,)):
        raise ConfigError(f"{path}: control_input {c.name!r} must be [B] or [B, 1]")
    return ControlSpec(c.name, c.kind, dtype, c.false_true), tuple(1 for _ in shape[1:])


def _bind_outputs(triton: TritonModel, graph: dict[str, ort.NodeArg], batched: bool,
                  path: Path) -> tuple[TensorSpec | None, TensorSpec | None, int]:  # fmt: skip
    state_outputs = {s.output_name for s in triton.states}
    step = final = None
    classes: set[int] = set()
    for out in triton.outputs:
        if out.name in state_outputs:
            continue
        spec, shape = _bind_tensor(out, graph, batched, path, "output")
        if spec.dtype not in FLOATS or len(shape) not in (2, 3) or shape[-1] is None:
            raise ConfigError(f"{path}: output {out.name!r} must be float [B, C] or [B, T, C] "
                              f"with a fixed C, is {fmt(shape)}")  # fmt: skip
        if (step if len(shape) == 3 else final) is not None:
            raise ConfigError(f"{path}: output {out.name!r}: a second {len(shape)}-d output")
        if len(shape) == 3:
            step = spec
        else:
            final = spec
        classes.add(int(shape[-1]))
    if not classes:
        raise ConfigError(f"{path}: output lists no class output ([B, C] or [B, T, C])")
    if len(classes) > 1:
        raise ConfigError(f"{path}: the outputs disagree on the class count: {sorted(classes)}")
    return step, final, classes.pop()


def _own_description(session: ort.InferenceSession) -> ModelDescription | None:
    """Our description in the file's metadata, if it has one (never required here)."""
    metadata = session.get_modelmeta().custom_metadata_map
    if DESCRIPTION_KEY not in metadata:
        return None
    try:
        return ModelDescription.from_metadata(metadata)
    except DescriptionError:
        return None


def _labels(triton: TritonModel, outputs: list[TensorSpec], classes: int) -> tuple[str, ...]:
    """Labels from the first output that names a label file, else class_0 .. class_{C-1}."""
    for out in outputs:
        if out.label_filename:
            return triton.labels(out, classes)
    return triton.labels(outputs[0], classes)


def _tokenizer(triton: TritonModel, vocab_size: int) -> Tokenizer | None:
    """parameters vocab_filename: text in, one character per token id."""
    found = read_vocabulary(triton)
    if found is None:
        return None
    vocab, lowercase = found
    if len(vocab) > vocab_size:
        raise ConfigError(
            f"{triton.path}: vocab_filename {triton.parameters['vocab_filename'][:64]!r} has "
            f"{len(vocab)} characters, the model takes {vocab_size} token ids"
        )
    return Tokenizer(vocab=vocab, lowercase=lowercase, unknown_id=0)


def _vocab_size(triton: TritonModel, data: TensorSpec, graph: OnnxGraph | None,
                unread: str) -> tuple[int, str]:  # fmt: skip
    """(size, rule): parameters vocab_size, else the rows of the embedding table the token input
    indexes, else the characters of vocab_filename."""
    raw = triton.parameters.get("vocab_size")
    if raw is not None:
        if not raw.strip().isdigit() or int(raw) < 1:
            raise ConfigError(f"{triton.path}: parameters vocab_size {raw[:64]!r} is not >= 1")
        return int(raw), "parameters vocab_size in config.pbtxt"
    found = embedding_rows(graph, data.name) if graph is not None else None
    if found is not None:
        return found
    if (vocabulary := read_vocabulary(triton)) is not None:
        return len(vocabulary[0]), "the characters listed in vocab_filename"
    why = unread or f"no Gather of {data.name!r} indexes a table in the graph"
    raise ConfigError(
        f"{triton.path}: the vocabulary size of input {data.name!r} is not known ({why}): set "
        'parameters { key: "vocab_size" value: { string_value: "N" } }'
    )
