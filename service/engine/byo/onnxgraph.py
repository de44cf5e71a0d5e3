"""The few facts of an ONNX graph that onnxruntime does not expose, read from the file itself.

onnxruntime's session shows a model's inputs, outputs and metadata, but neither its nodes nor
the initializers it does not take as inputs. What the server must know of a user's own model
is in those: how many token ids its embedding table holds (the rows of the initializer a
`Gather` of the token input indexes) and whether a class output already is a distribution (a
`Softmax` or `LogSoftmax` at its tail). Both are read here from the protobuf wire format
(https://protobuf.dev/programming-guides/encoding/) with the field numbers of onnx.proto, which
ONNX never renumbers: no `onnx` package (the serving environment has none) and no protobuf
runtime (the engine imports none). Weights are skipped by their length, never copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# onnx.proto field numbers of what is read (ModelProto, GraphProto, NodeProto, ...).
MODEL_GRAPH, MODEL_OPSET = 7, 8
OPSET_DOMAIN, OPSET_VERSION = 1, 2
GRAPH_NODE, GRAPH_INITIALIZER = 1, 5
NODE_INPUT, NODE_OUTPUT, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 1, 2, 4, 5, 7
ATTR_NAME, ATTR_INT, ATTR_TENSOR = 1, 3, 5
TENSOR_DIMS, TENSOR_NAME = 1, 8
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5

Span = tuple[int, int]  # [start, end) of a length-delimited field in the file's bytes


class OnnxFormatError(ValueError):
    """The bytes are not the ONNX protobuf this reader expects."""


@dataclass(frozen=True)
class Node:
    op_type: str
    domain: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ints: dict[str, int] = field(default_factory=dict)  # integer attributes (a Softmax's axis)
    tensor_dims: tuple[int, ...] | None = None  # a Constant's value: its dims


@dataclass(frozen=True)
class OnnxGraph:
    """The main graph's nodes (in file order) and its initializers' dims, by name."""

    nodes: tuple[Node, ...]
    initializers: dict[str, tuple[int, ...]]
    opset: int  # of the default domain ("" / ai.onnx)
    producers: dict[str, Node] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        made = {out: node for node in self.nodes for out in node.outputs if out}
        object.__setattr__(self, "producers", made)

    def constant_dims(self, name: str) -> tuple[int, ...] | None:
        """The dims of an initializer or of a Constant node's value, else None."""
        if name in self.initializers:
            return self.initializers[name]
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            return node.tensor_dims
        return None


def read_graph(path: Path) -> OnnxGraph:
    """The graph of an ONNX file (external data is never read: only dims and nodes are)."""
    return parse_model(path.read_bytes())


def parse_model(buf: bytes) -> OnnxGraph:
    graph: Span | None = None
    opset = 0
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number == MODEL_GRAPH and wire == LENGTH:
            graph = value  # type: ignore[assignment]
        elif number == MODEL_OPSET and wire == LENGTH:
            domain, version = _opset(buf, value)  # type: ignore[arg-type]
            if domain in ("", "ai.onnx"):
                opset = version
    if graph is None:
        raise OnnxFormatError("the file has no graph (not an ONNX model)")
    nodes, inits = [], {}
    for number, wire, value in _fields(buf, *graph):
        if wire != LENGTH:
            continue
        if number == GRAPH_NODE:
            nodes.append(_node(buf, value))  # type: ignore[arg-type]
        elif number == GRAPH_INITIALIZER:
            name, dims = _tensor(buf, value)  # type: ignore[arg-type]
            inits[name] = dims
    return OnnxGraph(tuple(nodes), inits, opset)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise OnnxFormatError(f"a truncated or overlong varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _signed(value: int) -> int:
    """An int64 field's value (negative numbers are sent as 10-byte two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int | Span]]:
    """(field number, wire type, varint value or span) of each field of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == LENGTH:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise OnnxFormatError(f"field {number} runs past its message at byte {pos}")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (FIXED64, FIXED32):
            pos += 8 if wire == FIXED64 else 4
        else:
            raise OnnxFormatError(f"wire type {wire} (field {number}) at byte {pos}")
    if pos != end:
        raise OnnxFormatError(f"a message overruns its end at byte {end}")


def _text(buf: bytes, span: Span) -> str:
    return buf[span[0] : span[1]].decode("utf-8", errors="replace")


def _opset(buf: bytes, span: Span) -> tuple[str, int]:
    domain, version = "", 0
    for number, wire, value in _fields(buf, *span):
        if number == OPSET_DOMAIN and wire == LENGTH:
            domain = _text(buf, value)  # type: ignore[arg-type]
        elif number == OPSET_VERSION and wire == VARINT:
            version = int(value)  # type: ignore[arg-type]
    return domain, version


def _node(buf: bytes, span: Span) -> Node:
    inputs, outputs, op_type, domain = [], [], "", ""
    ints: dict[str, int] = {}
    dims = None
    for number, wire, value in _fields(buf, *span):
        if wire != LENGTH:
            continue
        if number == NODE_INPUT:
            inputs.append(_text(buf, value))  # type: ignore[arg-type]
        elif number == NODE_OUTPUT:
            outputs.append(_text(buf, value))  # type: ignore[arg-type]
        elif number == NODE_OP_TYPE:
            op_type = _text(buf, value)  # type: ignore[arg-type]
        elif number == NODE_DOMAIN:
            domain = _text(buf, value)  # type: ignore[arg-type]
        elif number == NODE_ATTRIBUTE:
            name, integer, tensor = _attribute(buf, value)  # type: ignore[arg-type]
            if integer is not None:
                ints[name] = integer
            if tensor is not None and name == "value":
                dims = tensor
    return Node(op_type, domain, tuple(inputs), tuple(outputs), ints, dims)


def _attribute(buf: bytes, span: Span) -> tuple[str, int | None, tuple[int, ...] | None]:
    name, integer, dims = "", None, None
    for number, wire, value in _fields(buf, *span):
        if number == ATTR_NAME and wire == LENGTH:
            name = _text(buf, value)  # type: ignore[arg-type]
        elif number == ATTR_INT and wire == VARINT:
            integer = _signed(value)  # type: ignore[arg-type]
        elif number == ATTR_TENSOR and wire == LENGTH:
            dims = _tensor(buf, value)[1]  # type: ignore[arg-type]
    return name, integer, dims


def _tensor(buf: bytes, span: Span) -> tuple[str, tuple[int, ...]]:
    """A TensorProto's name and dims (its data is skipped)."""
    name, dims = "", []
    for number, wire, value in _fields(buf, *span):
        if number == TENSOR_NAME and wire == LENGTH:
            name = _text(buf, value)  # type: ignore[arg-type]
        elif number == TENSOR_DIMS and wire == VARINT:
            dims.append(_signed(value))  # type: ignore[arg-type]
        elif number == TENSOR_DIMS and wire == LENGTH:  # packed
            pos, end = value  # type: ignore[misc]
            while pos < end:
                dim, pos = _varint(buf, pos)
                dims.append(_signed(dim))
    return name, tuple(dims)
