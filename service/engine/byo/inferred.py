"""What the server infers about a config.pbtxt model from its graph, each fact with the rule that
gave it (logged at load, shown in the model's metadata, overridable in config.pbtxt).

- output kind: a class output whose last node is a `Softmax` over the classes is probabilities,
  served as they are; a `LogSoftmax` (or `Log` of such a `Softmax`) is log-probabilities; any
  other is logits. Nodes that only move or select values (Identity, Cast, Reshape, Squeeze,
  Unsqueeze, Flatten, the Gathers, Slice) are looked through. `parameters output_kind`
  overrides; a file that carries lstm-serve's own description keeps its kind (probabilities).
- vocabulary size: the rows of the table a `Gather` of the token input indexes (an
  `nn.Embedding`). `parameters vocab_size` overrides.
"""

from __future__ import annotations

from typing import TypeGuard

from lstmserve.contract import KIND_LOG_PROBS, KIND_LOGITS, KIND_PROBS
from service.engine.byo.onnxgraph import Node, OnnxGraph

# Ops whose first input's values reach their output unchanged (moved, selected or retyped).
PASS_THROUGH = frozenset(
    {"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Gather", "GatherElements",
     "GatherND", "Slice"}
)  # fmt: skip
SAME_RANK = frozenset({"Identity", "Cast"})
# Ops that pass token ids on to the Gather that looks them up.
INDEX_PASS_THROUGH = frozenset({"Identity", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
MEANING = {
    KIND_PROBS: "probabilities, served as they are",
    KIND_LOG_PROBS: "log-probabilities (the native API's probabilities are their exp)",
    KIND_LOGITS: "logits (the native API's probabilities are their softmax)",
}


def _standard(node: Node) -> bool:
    return node.domain in ("", "ai.onnx")


def _tail(graph: OnnxGraph, name: str) -> tuple[Node | None, bool]:
    """The node that computes `name`'s values, past pass-through nodes, and whether every node
    passed kept the rank."""
    same_rank, seen = True, set()
    node = graph.producers.get(name)
    while node is not None and _standard(node) and node.op_type in PASS_THROUGH:
        if id(node) in seen or not node.inputs:
            break
        seen.add(id(node))
        same_rank = same_rank and node.op_type in SAME_RANK
        node = graph.producers.get(node.inputs[0])
    return node, same_rank


def _is_softmax(node: Node | None) -> TypeGuard[Node]:
    return node is not None and _standard(node) and node.op_type == "Softmax"


def _over_classes(graph: OnnxGraph, node: Node, rank: int, same_rank: bool) -> bool:
    """A (Log)Softmax normalises over the last axis: the classes of a [B, C] / [B, T, C] output.
    Before opset 13 the default axis is 1 (of the input flattened to 2-D at it)."""
    axis = node.ints.get("axis", -1 if graph.opset >= 13 or graph.opset == 0 else 1)
    return axis == -1 or (same_rank and axis == rank - 1)


def output_kind(graph: OnnxGraph, output: str, rank: int) -> tuple[str, str]:
    """(kind, rule) of one class output of `rank` dims (batch included)."""
    node, same_rank = _tail(graph, output)
    if node is None:
        return KIND_LOGITS, f"{output!r} is not computed by a node: {MEANING[KIND_LOGITS]}"
    op = node.op_type if _standard(node) else f"{node.domain}.{node.op_type}"
    if op == "Log" and node.inputs:
        inner, inner_same = _tail(graph, node.inputs[0])
        if _is_softmax(inner) and _over_classes(graph, inner, rank, same_rank and inner_same):
            return KIND_LOG_PROBS, (f"{output!r} ends in Log of a Softmax over the classes: "
                                    f"{MEANING[KIND_LOG_PROBS]}")  # fmt: skip
    if op in ("Softmax", "LogSoftmax"):
        kind = KIND_PROBS if op == "Softmax" else KIND_LOG_PROBS
        if _over_classes(graph, node, rank, same_rank):
            return kind, f"{output!r} ends in a {op} over the classes: {MEANING[kind]}"
        return KIND_LOGITS, (f"{output!r} ends in a {op} over another axis than the classes "
                             f"(axis {node.ints.get('axis')}): {MEANING[KIND_LOGITS]}")  # fmt: skip
    return KIND_LOGITS, (f"{output!r} ends in a {op} node (no Softmax or LogSoftmax): "
                         f"{MEANING[KIND_LOGITS]}")  # fmt: skip


def configured_kind(kind: str) -> tuple[str, str]:
    """(kind, rule) when config.pbtxt says it."""
    return kind, f"parameters output_kind {kind!r} in config.pbtxt: {MEANING[kind]}"


def embedding_rows(graph: OnnxGraph, input_name: str) -> tuple[int, str] | None:
    """(rows, rule) of the smallest table a Gather of the token input indexes, else None."""
    names = {input_name}
    found: list[tuple[int, str]] = []
    for node in graph.nodes:  # in file order: producers before consumers
        if not _standard(node) or not node.inputs:
            continue
        if node.op_type in INDEX_PASS_THROUGH and node.inputs[0] in names:
            names.update(node.outputs)
        elif node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[1] in names:
            table = _table(graph, node.inputs[0])
            if table is not None:
                found.append(table)
    if not found:
        return None
    rows, table = min(found)
    return rows, (f"the rows of the table {table!r} that input {input_name!r} indexes "
                  "(a Gather: an embedding)")  # fmt: skip


def _table(graph: OnnxGraph, name: str) -> tuple[int, str] | None:
    """(rows, name) of a constant table, looked for through Identity / Cast nodes."""
    for _ in range(8):
        dims = graph.constant_dims(name)
        if dims:
            return (int(dims[0]), name) if dims[0] > 0 else None
        node = graph.producers.get(name)
        if node is None or node.op_type not in ("Identity", "Cast") or not node.inputs:
            return None
        name = node.inputs[0]
    return None
