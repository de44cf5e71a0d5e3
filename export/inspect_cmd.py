"""`lstm-export inspect MODEL_DIR [--json]`: an exported model's parameters gate by gate.

Everything is read from the ONNX file with `onnx` alone, so it works on our exports and on a
model of your own (a folder with a config.pbtxt) alike: every native `LSTM` / `GRU` / `RNN` node
is one layer (both directions), its W [D, G*H, I], R [D, G*H, H], B [D, 2*G*H] and P [D, 3H] split
in the ONNX operator's gate order (LSTM i, o, f, c; GRU z, r, h; peepholes i, o, f). Our Jordan
network (a `Scan`) is read from its named initializers (export/jordan.py).

The forget-gate bias is summarised (Wb_f + Rb_f, the bias the gate adds): the lecture notes
advise starting it at 1-2 so that an untrained cell keeps its memory; next to it stands what the
model was initialised with (its description's `forget_bias`), so you see what training did. A
GRU's update gate z plays the same part (h = (1 - z) n + z h_prev: z near 1 keeps), and a
coupled (CIFG) LSTM's forget gate is 1 - i, so its "forget bias" is minus the input gate's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from export.model_paths import resolve_model
from service.engine.byo.tritonconfig import CONFIG_FILE

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
# The ONNX operators' gate blocks, in order, with the names the lecture notes use.
GATE_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "LSTM": (("i", "input"), ("o", "output"), ("f", "forget"), ("c", "cell (candidate)")),
    "GRU": (("z", "update"), ("r", "reset"), ("h", "new (candidate)")),
    "RNN": (("h", "hidden"),),
}
PEEPHOLE_ORDER = ("i", "o", "f")


def config_dir(model_file: Path) -> Path | None:
    """The folder holding a config.pbtxt for this model (a model of your own), if any."""
    for folder in (model_file.parent, model_file.parent.parent):
        if (folder / CONFIG_FILE).is_file():
            return folder
    return None


def constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' values (torch.onnx.export writes either)."""
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


@dataclass
class RecurrentNode:
    """One native recurrent node and its weights (ONNX layout)."""

    op: str
    name: str
    index: int
    hidden: int
    directions: int
    W: np.ndarray
    R: np.ndarray
    B: np.ndarray
    P: np.ndarray | None
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def gates(self) -> tuple[tuple[str, str], ...]:
        return GATE_NAMES[self.op]

    def block(self, array: np.ndarray, d: int, k: int, offset: int = 0) -> np.ndarray:
        h = self.hidden
        return array[d, offset + k * h : offset + (k + 1) * h]

    def biases(self, d: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.block(self.B, d, k), self.block(self.B, d, k, len(self.gates) * self.hidden)


def _weight(values: dict[str, np.ndarray], name: str, what: str, where: str) -> np.ndarray:
    if name not in values:
        raise ValueError(f"{where}: input {what} ({name[:64]!r}) is not an initializer or a "
                         "Constant")  # fmt: skip
    return np.asarray(values[name], dtype=np.float32)


def recurrent_nodes(proto: onnx.ModelProto) -> list[RecurrentNode]:
    """Every native LSTM / GRU / RNN node of the main graph, in graph order."""
    values = constants(proto)
    found = []
    for node in proto.graph.node:
        if node.op_type not in RECURRENT_OPS:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input) + [""] * (8 - len(node.input))

        where = f"{node.op_type} node {node.name!r}"
        w, r = _weight(values, ins[1], "W", where), _weight(values, ins[2], "R", where)
        hidden = int(attrs.get("hidden_size", r.shape[-1]))
        gates = len(GATE_NAMES[node.op_type])
        no_bias = np.zeros((w.shape[0], 2 * gates * hidden), np.float32)
        b = _weight(values, ins[3], "B", where) if ins[3] else no_bias
        p = _weight(values, ins[7], "P", where) if node.op_type == "LSTM" and ins[7] else None
        found.append(RecurrentNode(
            op=node.op_type, name=node.name or f"{node.op_type}_{len(found)}", index=len(found),
            hidden=hidden, directions=int(w.shape[0]), W=w, R=r, B=b, P=p,
            inputs=ins, outputs=list(node.output), attrs=attrs,
        ))  # fmt: skip
    return found


def _tensor_info(name: str, value: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "shape": list(value.shape),
        "parameters": int(value.size),
        "l2_norm": round(float(np.linalg.norm(value)), 6),
        "mean": round(float(value.mean()), 6),
        "abs_max": round(float(np.abs(value).max()), 6) if value.size else 0.0,
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    return {k: round(float(f(values)), 6) for k, f in (("mean", np.mean), ("min", np.min),
                                                       ("max", np.max))}  # fmt: skip


def _node_report(node: RecurrentNode, init_forget_bias: float | None) -> dict[str, Any]:
    names = ("forward", "reverse")
    coupled = bool(node.attrs.get("input_forget", 0))
    layer: dict[str, Any] = {
        "layer": node.index, "op": node.op, "node": node.name, "hidden_size": node.hidden,
        "directions": node.directions, "coupled_input_forget": coupled,
        "peepholes": node.P is not None, "parameters": int(node.W.size + node.R.size + node.B.size
                                                           + (node.P.size if node.P is not None
                                                              else 0)),
    }  # fmt: skip
    if node.op == "GRU":
        layer["linear_before_reset"] = int(node.attrs.get("linear_before_reset", 0))
    layer["per_direction"] = []
    for d in range(node.directions):
        gates = []
        for k, (short, long) in enumerate(node.gates):
            wb, rb = node.biases(d, k)
            gate = {
                "gate": short, "name": long,
                "W": _tensor_info(f"W_{short}", node.block(node.W, d, k)),
                "R": _tensor_info(f"R_{short}", node.block(node.R, d, k)),
                "Wb": _tensor_info(f"Wb_{short}", wb), "Rb": _tensor_info(f"Rb_{short}", rb),
                "bias_sum": _summary(wb + rb),
            }  # fmt: skip
            if coupled and short == "f":
                gate["unused"] = "input_forget=1: f = 1 - i, this block is ignored"
            gates.append(gate)
        entry: dict[str, Any] = {"direction": names[d], "gates": gates}
        if node.P is not None:
            entry["peepholes"] = [
                _tensor_info(f"P_{g}", node.P[d, j * node.hidden : (j + 1) * node.hidden])
                for j, g in enumerate(PEEPHOLE_ORDER)
            ]
        entry["forget_bias"] = _forget_bias(node, d, coupled, init_forget_bias)
        layer["per_direction"].append(entry)
    return layer


def _forget_bias(
    node: RecurrentNode, d: int, coupled: bool, initial: float | None
) -> dict[str, Any] | None:
    """What keeps memory: LSTM f (or -i under CIFG), GRU z; an Elman RNN has no such gate."""
    if node.op == "RNN":
        return None
    if node.op == "LSTM":
        k = [g for g, _ in node.gates].index("i" if coupled else "f")
        wb, rb = node.biases(d, k)
        values, gate = (-(wb + rb), "-(b_i) (f = 1 - i)") if coupled else (wb + rb, "b_f")
    else:
        wb, rb = node.biases(d, 0)
        values, gate = wb + rb, "b_z (update gate: z near 1 keeps h)"
    out: dict[str, Any] = {"gate": gate, **_summary(values), "values": np.round(values, 4).tolist()}
    out["advice"] = "initialise to 1-2 (lecture notes)"
    if initial is not None:
        out["initialised_to"] = initial
        out["moved_by_training"] = round(float(np.mean(values)) - initial, 6)
    return out


def _jordan_report(values: dict[str, np.ndarray]) -> dict[str, Any]:
    from export.jordan import B_H, W_XH, W_YH

    tensors = [
        _tensor_info("W_xh (input -> hidden)", values[W_XH].T),
        _tensor_info("W_yh (previous output -> hidden)", values[W_YH].T),
        _tensor_info("b_h", values[B_H]),
    ]
    return {
        "layer": 0, "op": "Jordan (Scan)", "hidden_size": int(values[W_XH].shape[1]),
        "directions": 1, "recurrent_input": "the previous step's class probabilities",
        "parameters": sum(t["parameters"] for t in tensors), "tensors": tensors,
        "forget_bias": None,
    }  # fmt: skip


def _other_recurrent_ops(proto: onnx.ModelProto) -> str:
    """A hint naming recurrent-looking ops that are not the standard ones (quantized copies)."""
    ops = sorted({n.op_type for n in proto.graph.node if n.op_type not in RECURRENT_OPS
                  and any(k in n.op_type for k in RECURRENT_OPS)})  # fmt: skip
    return f"; it has {', '.join(ops)} (not the standard operator, not read)" if ops else ""


def inspect_model(path: Path) -> dict[str, Any]:
    """The whole report of one model (JSON-ready)."""
    model_file = resolve_model(path)
    proto = onnx.load(str(model_file))
    meta = {p.key: p.value for p in proto.metadata_props}
    from lstmserve.contract import DESCRIPTION_KEY

    arch: dict[str, Any] = {}
    if DESCRIPTION_KEY in meta:
        arch = json.loads(meta[DESCRIPTION_KEY]).get("architecture", {})
    values = constants(proto)
    report: dict[str, Any] = {
        "model": str(model_file),
        "kind": "lstm-serve export" if arch else "model of your own (no lstm_serve metadata)",
        "config_pbtxt": str(config_dir(model_file) or "") or None,
        "architecture": arch or None,
    }
    if arch.get("cell") == "jordan":
        layers = [_jordan_report(values)]
    else:
        initial = float(arch["forget_bias"]) if "forget_bias" in arch else None
        layers = [_node_report(node, initial) for node in recurrent_nodes(proto)]
    if not layers:
        raise ValueError(f"{model_file}: no LSTM / GRU / RNN node (nor a Jordan Scan) to inspect"
                         + _other_recurrent_ops(proto))  # fmt: skip
    report["layers"] = layers
    report["recurrent_parameters"] = sum(layer["parameters"] for layer in layers)
    report["all_parameters"] = int(sum(v.size for v in values.values() if v.dtype.kind == "f"))
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as text: one line per tensor."""
    lines = [f"{report['model']}  ({report['kind']})"]
    for layer in report["layers"]:
        head = f"layer {layer['layer']}: {layer['op']} H={layer['hidden_size']}"
        head += f" directions={layer['directions']} parameters={layer['parameters']}"
        if layer.get("coupled_input_forget"):
            head += " coupled input-forget (CIFG)"
        if layer.get("peepholes"):
            head += " peepholes"
        lines.append(head)
        for t in layer.get("tensors", []):
            lines.append(f"  {t['name']:34s} {t['shape']!s:12s} n={t['parameters']:<7d} "
                         f"|.|={t['l2_norm']:.4f}")  # fmt: skip
        for entry in layer.get("per_direction", []):
            lines.append(f"  {entry['direction']}:")
            for gate in entry["gates"]:
                lines.append(f"    gate {gate['gate']} ({gate['name']})"
                             + ("  [unused]" if "unused" in gate else ""))  # fmt: skip
                for key in ("W", "R", "Wb", "Rb"):
                    t = gate[key]
                    lines.append(f"      {t['name']:6s} {t['shape']!s:12s} "
                                 f"n={t['parameters']:<7d} |.|={t['l2_norm']:.4f}")  # fmt: skip
            for t in entry.get("peepholes", []):
                lines.append(f"    peephole {t['name']:6s} {t['shape']!s:8s} "
                             f"|.|={t['l2_norm']:.4f}")  # fmt: skip
            fb = entry.get("forget_bias")
            if fb:
                line = (f"    forget bias {fb['gate']}: mean {fb['mean']:.4f} min {fb['min']:.4f}"
                        f" max {fb['max']:.4f}")  # fmt: skip
                if "initialised_to" in fb:
                    line += f" (initialised to {fb['initialised_to']}; notes advise 1-2)"
                lines.append(line)
    lines.append(f"recurrent parameters: {report['recurrent_parameters']}; all float "
                 f"parameters: {report['all_parameters']}")  # fmt: skip
    return "\n".join(lines)
