"""`lstm-export config MODEL.onnx`: a starter Triton config.pbtxt for any ONNX file.

The graph's inputs and outputs become `input` / `output` entries (the batch axis left out and
`max_batch_size` set when every tensor has a symbolic batch axis); input/output pairs of the same
type and shape whose names look like a recurrent state (h0/hn, state/state_out, c_in/c_out, ...)
become `sequence_batching { state [...] }` with zero initial states, and inputs named like
Triton's sequence controls (START, END, READY) its `control_input`. Only fields the lstm-serve
loader (service/engine/byo/tritonconfig.py) serves are written. It is a guess for the user to edit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf import text_format
from onnx import TensorProto
from tritonclient.grpc import model_config_pb2 as mc

from lstmserve.contract import DESCRIPTION_KEY
from service.engine.byo.inferred import embedding_rows, output_kind
from service.engine.byo.onnxgraph import parse_model

DEFAULT_MAX_BATCH = 64
IDLE_MICROSECONDS = 60_000_000
LABELS_PLACEHOLDER = "labels.txt"

TRITON_TYPES: dict[int, int] = {
    TensorProto.BOOL: mc.TYPE_BOOL,
    TensorProto.UINT8: mc.TYPE_UINT8,
    TensorProto.UINT16: mc.TYPE_UINT16,
    TensorProto.UINT32: mc.TYPE_UINT32,
    TensorProto.UINT64: mc.TYPE_UINT64,
    TensorProto.INT8: mc.TYPE_INT8,
    TensorProto.INT16: mc.TYPE_INT16,
    TensorProto.INT32: mc.TYPE_INT32,
    TensorProto.INT64: mc.TYPE_INT64,
    TensorProto.FLOAT16: mc.TYPE_FP16,
    TensorProto.FLOAT: mc.TYPE_FP32,
    TensorProto.DOUBLE: mc.TYPE_FP64,
    TensorProto.STRING: mc.TYPE_STRING,
    TensorProto.BFLOAT16: mc.TYPE_BF16,
}
_STATE_NAME = re.compile(r"(state|hidden|memory|carry|cell|^[hc]$|^[hc]x$|^[hc][_.]|[_.][hc]$)")
_MARKS = {
    "in": (("in", "input", "prev", "init", "initial"), re.compile(r"(.+?)[_.]?0")),
    "out": (("out", "output", "next", "new", "final"),
            re.compile(r"((?:.*[_.])?(?:[hc]|[hc]x|state|hidden|cell))[_.]?n")),
}  # fmt: skip
_LENGTH_NAME = re.compile(r"(length|lens$|seq_len|sequence_len)")
_CONTROL = mc.ModelSequenceBatching.Control
# Triton's sequence control inputs, by name (START, sequence_start, seq_end, READY, ...).
CONTROL_NAMES: dict[str, tuple[re.Pattern[str], int]] = {
    kind: (re.compile(rf"(seq(uence)?[_.]?)?{kind.lower()}"), code)
    for kind, code in (("START", _CONTROL.CONTROL_SEQUENCE_START),
                       ("END", _CONTROL.CONTROL_SEQUENCE_END),
                       ("READY", _CONTROL.CONTROL_SEQUENCE_READY))
}  # fmt: skip


@dataclass(frozen=True)
class Tensor:
    """A graph input or output: name, ONNX element type, shape (None = symbolic)."""

    name: str
    elem_type: int
    shape: tuple[int | None, ...]


def _tensors(values: list[onnx.ValueInfoProto]) -> list[Tensor]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        out.append(Tensor(v.name, t.elem_type, dims))
    return out


def graph_tensors(proto: onnx.ModelProto) -> tuple[list[Tensor], list[Tensor]]:
    """The graph's real inputs (initializers left out) and its outputs."""
    inits = {i.name for i in proto.graph.initializer}
    inputs = [t for t in _tensors(list(proto.graph.input)) if t.name not in inits]
    return inputs, _tensors(list(proto.graph.output))


def _stem(name: str, side: str) -> tuple[str, bool]:
    """The name without its in/out marker ('state_in' -> 'state', 'h0' / 'hn' -> 'h'), and
    whether it had one."""
    low = name.lower()
    words, numbered = _MARKS[side]
    for word in words:
        for sep in ("_", ".", "-", ""):
            mark = sep + word
            if low.endswith(mark) and len(low) > len(mark):
                return low[: -len(mark)], True
            if sep and low.startswith(word + sep) and len(low) > len(mark):
                return low[len(mark) :], True
    match = numbered.fullmatch(low)
    return (match.group(1), True) if match else (low, False)


def state_pairs(inputs: list[Tensor], outputs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Input/output pairs of one type and shape whose names say state (h0/hn, state/state_out)."""
    pairs, taken = [], set()
    for i in inputs:
        if i.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            continue
        stem_i, marked_i = _stem(i.name, "in")
        for o in outputs:
            if o.name in taken or (o.elem_type, len(o.shape)) != (i.elem_type, len(i.shape)):
                continue
            if any(a != b and None not in (a, b) for a, b in zip(i.shape, o.shape, strict=True)):
                continue
            stem_o, marked_o = _stem(o.name, "out")
            if stem_i == stem_o and (marked_i or marked_o) and _STATE_NAME.search(stem_i):
                pairs.append((i, o))
                taken.add(o.name)
                break
    return pairs


def control_inputs(inputs: list[Tensor]) -> list[tuple[Tensor, int]]:
    """Inputs [B] or [B, 1] named like Triton's START / END / READY controls, with their kind."""
    found = []
    for t in inputs:
        if len(t.shape) not in (1, 2) or t.shape[1:] not in ((), (1,), (None,)):
            continue
        for pattern, code in CONTROL_NAMES.values():
            if pattern.fullmatch(t.name.lower()):
                found.append((t, code))
    return found


def _add_controls(config: mc.ModelConfig, controls: list[tuple[Tensor, int]]) -> None:
    """control_input entries: false/true as 0/1 in the input's own type."""
    for t, code in controls:
        control = config.sequence_batching.control_input.add(name=t.name).control.add(kind=code)
        if t.elem_type == TensorProto.BOOL:
            control.bool_false_true.extend([False, True])
        elif t.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            control.fp32_false_true.extend([0.0, 1.0])
        else:
            control.int32_false_true.extend([0, 1])
            if t.elem_type != TensorProto.INT32 and t.elem_type in TRITON_TYPES:
                control.data_type = TRITON_TYPES[t.elem_type]  # type: ignore[assignment]


def batch_axis(t: Tensor) -> int | None:
    """The one symbolic axis of a state tensor (its batch), if there is exactly one."""
    symbolic = [k for k, d in enumerate(t.shape) if d is None]
    return symbolic[0] if len(symbolic) == 1 else None


def _dims(shape: tuple[int | None, ...], drop: int | None) -> list[int]:
    return [-1 if d is None else d for k, d in enumerate(shape) if k != drop]


def _add_tensor(entry: mc.ModelInput | mc.ModelOutput, t: Tensor, batched: bool) -> None:
    entry.name = t.name
    if t.elem_type not in TRITON_TYPES:
        raise ValueError(f"{t.name!r} has ONNX element type {t.elem_type}, which Triton lacks")
    entry.data_type = TRITON_TYPES[t.elem_type]  # type: ignore[assignment]
    dims = _dims(t.shape, 0 if batched else None)
    if batched and not dims:  # [B] in the graph: Triton's dims [1], reshaped to the graph's []
        dims = [1]
        entry.reshape.SetInParent()
    entry.dims.extend(dims)


def _add_states(
    config: mc.ModelConfig, pairs: list[tuple[Tensor, Tensor]], batched: bool
) -> int | None:
    """sequence_batching with one zero-initialised state per pair; returns the states' batch
    axis when it is not 0 (a torch LSTM's h0 is [layers, B, H]) and the model is batched."""
    seq = config.sequence_batching
    axes = {batch_axis(i) for i, _ in pairs}
    axis = axes.pop() if len(axes) == 1 else None
    for i, o in pairs:
        drop = axis if batched else None
        state = seq.state.add(input_name=i.name, output_name=o.name)
        state.data_type = TRITON_TYPES[i.elem_type]  # type: ignore[assignment]
        state.dims.extend(_dims(i.shape, drop))
        init = state.initial_state.add()
        init.data_type = state.data_type
        init.dims.extend(state.dims)
        init.zero_data = True
        init.name = f"{i.name}_zero"
    return axis if batched and axis not in (None, 0) else None


def _is_batched(tensors: list[Tensor], states: list[tuple[Tensor, Tensor]]) -> bool:
    """Every non-state tensor has a symbolic axis 0 and every state one symbolic axis."""
    state_names = {t.name for pair in states for t in pair}
    rest = [t for t in tensors if t.name not in state_names]
    return (
        bool(rest)
        and all(t.shape and t.shape[0] is None for t in rest)
        and all(batch_axis(t) is not None for t in tensors if t.name in state_names)
    )


def _guess_parameters(config: mc.ModelConfig, inputs: list[Tensor]) -> None:
    """lengths_input, where an input's name and shape suggest one."""
    for t in inputs:
        ints = t.elem_type in (TensorProto.INT64, TensorProto.INT32)
        if ints and len(t.shape) == 1 and _LENGTH_NAME.search(t.name.lower()):
            config.parameters["lengths_input"].string_value = t.name


def _inferred_notes(proto: onnx.ModelProto, config: mc.ModelConfig,
                    outputs: list[Tensor]) -> list[str]:  # fmt: skip
    """What the server will read from the graph without a parameter (the output kind, the
    vocabulary size: service/engine/byo/inferred.py), said so that it can be checked."""
    graph = parse_model(proto.SerializeToString())
    notes = []
    for out in config.output:
        rank = next(len(t.shape) for t in outputs if t.name == out.name)
        kind, rule = output_kind(graph, out.name, rank)
        notes.append(f"NOTE: output_kind {kind}: {rule} (parameters output_kind overrides)")
    for t in config.input:
        ints = t.data_type in (mc.TYPE_INT64, mc.TYPE_INT32)
        found = embedding_rows(graph, t.name) if ints else None
        if found is not None:
            notes.append(f"NOTE: vocab_size {found[0]}: {found[1]} (parameters vocab_size "
                         "overrides)")  # fmt: skip
    return notes


def observed_output_shapes(path: Path, inputs: list[Tensor]) -> dict[str, tuple[int | None, ...]]:
    """Output shapes seen running the graph twice on zeros, every symbolic input dimension 2 then
    3 (a lengths input filled with it): a dimension that follows is dynamic (None), whatever the
    graph declares (torch's dynamo exporter declares the example's T). {} where it cannot run."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    shapes: list[dict[str, tuple[int, ...]]] = []
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        for k in (2, 3):
            feeds = {}
            for t in inputs:
                dims = [k if d is None else d for d in t.shape]
                fill = k if _LENGTH_NAME.search(t.name.lower()) and len(dims) <= 2 else 0
                feeds[t.name] = np.full(dims, fill, dtype=onnx.helper.tensor_dtype_to_np_dtype(
                    t.elem_type))  # fmt: skip
            shapes.append(
                {n: np.shape(v) for n, v in zip(names, sess.run(None, feeds), strict=True)}
            )
    except Exception:  # a graph that needs real inputs (or is not runnable here): as declared
        return {}
    return {
        n: tuple(None if a != b else a for a, b in zip(shapes[0][n], shapes[1][n], strict=True))
        for n in shapes[0]
        if len(shapes[0][n]) == len(shapes[1][n])
    }


def _merge_observed(
    outputs: list[Tensor], observed: dict[str, tuple[int | None, ...]]
) -> tuple[list[Tensor], list[str]]:
    """Declared output shapes corrected by what running the graph showed, and notes on each."""
    merged, notes = [], []
    for t in outputs:
        seen = observed.get(t.name)
        if seen is None or len(seen) != len(t.shape):
            merged.append(t)
            continue
        shape = tuple(None if s is None else (d if d is not None else s)
                      for d, s in zip(t.shape, seen, strict=True))  # fmt: skip
        follows = [k for k, (d, s) in enumerate(zip(t.shape, seen, strict=True)) if d and s is None]
        if follows:
            notes.append(f"NOTE: output {t.name!r} is declared {_dims(t.shape, None)}, but its "
                         f"axes {follows} follow the input's size: written as -1")  # fmt: skip
        merged.append(Tensor(t.name, t.elem_type, shape))
    return merged, notes


def _add_outputs(config: mc.ModelConfig, outputs: list[Tensor], batched: bool, ours: bool) -> None:
    """The non-state outputs; those with a fixed last axis (classes) get the label placeholder,
    except in an lstm-export model, which keeps its own labels."""
    for t in outputs:
        entry = config.output.add()
        _add_tensor(entry, t, batched)
        has_classes = t.shape and t.shape[-1] is not None and t.elem_type != TensorProto.STRING
        if has_classes and not ours:
            entry.label_filename = LABELS_PLACEHOLDER


def starter_config(
    proto: onnx.ModelProto, name: str, observed: dict[str, tuple[int | None, ...]] | None = None
) -> tuple[mc.ModelConfig, list[str]]:
    """The starter ModelConfig for an ONNX model (its output shapes corrected by `observed`),
    and notes on what to check."""
    inputs, outputs = graph_tensors(proto)
    outputs, notes = _merge_observed(outputs, observed or {})
    pairs = state_pairs(inputs, outputs)
    controls = control_inputs(inputs)
    batched = _is_batched(inputs + outputs, pairs)
    config = mc.ModelConfig(name=name, backend="onnxruntime")
    config.max_batch_size = DEFAULT_MAX_BATCH if batched else 0
    state_names = {t.name for pair in pairs for t in pair}
    taken = state_names | {t.name for t, _ in controls}
    for t in inputs:
        if t.name not in taken:
            _add_tensor(config.input.add(), t, batched)
    ours = any(p.key == DESCRIPTION_KEY for p in proto.metadata_props)
    _add_outputs(config, [t for t in outputs if t.name not in state_names], batched, ours)
    if ours:
        notes.append(
            "NOTE: this file carries an lstm-serve description (labels, tokenizer): "
            "it is served without a config; one beside it overrides what it names"
        )
    if pairs or controls:
        config.sequence_batching.max_sequence_idle_microseconds = IDLE_MICROSECONDS
    _add_controls(config, controls)
    if pairs:
        axis = _add_states(config, pairs, batched)
        if axis is not None:
            config.parameters["state_batch_axis"].string_value = str(axis)
    else:
        notes.append("TODO: no input/output pair looks like a recurrent state: add "
                     "sequence_batching { state [...] } by hand")  # fmt: skip
    _guess_parameters(config, inputs)
    if not ours:
        notes += _inferred_notes(proto, config, outputs)
    config.instance_group.add(count=1)
    return config, notes


def model_name(path: Path) -> str:
    """REPO/NAME/VERSION/model.onnx -> NAME; otherwise the file's stem."""
    parent = path.resolve().parent
    return parent.parent.name if parent.name.isdigit() else path.stem


def starter_config_text(path: Path, name: str | None = None) -> str:
    """The starter config as config.pbtxt text, with a header saying what to check."""
    if not path.is_file():
        raise ValueError(f"{str(path)[:64]!r} is not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError and others, on a file that is not ONNX
        raise ValueError(f"{path.name}: not an ONNX model ({type(exc).__name__})") from exc
    observed = observed_output_shapes(path, graph_tensors(proto)[0])
    config, notes = starter_config(proto, name or model_name(path), observed)
    header = [
        f"# Starter config.pbtxt for {config.name}, written by `lstm-export config {path.name}`.",
        "# Check every guess (state pairs, batch axis, label_filename, the NOTEs) and save it",
        f"# as REPO/{config.name}/config.pbtxt beside REPO/{config.name}/VERSION/model.onnx.",
        *(f"# {note}" for note in notes),
    ]
    return "\n".join(header) + "\n" + text_format.MessageToString(config, as_utf8=True)
