"""`lstm-export trace MODEL_DIR --text ... | --frames FILE | --tokens IDS [--out DIR]`: one
sequence recomputed step by step in numpy from the model's own initializers, every gate's
activation per step and unit written as JSON and drawn as heatmaps (PNG).

The recomputation follows the ONNX operators (LSTM gates i, f, o, candidate g, cell state c and h,
with peepholes and input_forget;
GRU z, r, h with either linear_before_reset; RNN tanh) and, for our exports, the whole graph
(embedding or normalisation, every layer, the head, the softmax); for the Jordan network its
Scan body. It is checked in the command itself against onnxruntime running the same file with
the recurrent nodes' outputs exposed: every h (each layer, each direction, each step) and, for
our exports, every step's probabilities; a difference beyond 1e-5 fails. A model of your own
(a config.pbtxt beside it) is fed through its own graph: each recurrent node's input X and
initial state come from onnxruntime, its gates from numpy, and the probabilities are the
graph's own output (logits through a softmax unless the config says otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from export.inspect_cmd import RecurrentNode, config_dir, constants, recurrent_nodes, resolve_model
from lstmserve.contract import DESCRIPTION_KEY, ModelDescription
from service.engine.byo.inferred import output_kind
from service.engine.byo.onnxgraph import parse_model

TOLERANCE = 1e-5


class TraceMismatch(RuntimeError):
    """numpy and onnxruntime disagree beyond the tolerance."""


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _check_default_activations(node: RecurrentNode) -> None:
    if node.attrs.get("activations") or node.attrs.get("clip") is not None:
        raise ValueError(f"{node.op} node {node.name!r}: custom activations / clip are not traced")
    if node.attrs.get("layout", 0):
        raise ValueError(f"{node.op} node {node.name!r}: layout=1 is not traced")


def run_direction(
    node: RecurrentNode, x: np.ndarray, d: int, h0: np.ndarray, c0: np.ndarray | None
) -> dict[str, np.ndarray]:
    """One direction over x (T, I) from h0 (H,) [c0]: gate activations, each (T, H), in the
    input's time order; a reverse direction runs from the last step to the first."""
    hid, n_steps = node.hidden, x.shape[0]
    w, r = node.W[d].astype(np.float64), node.R[d].astype(np.float64)
    g = len(node.gates)
    wb, rb = node.B[d, : g * hid].astype(np.float64), node.B[d, g * hid :].astype(np.float64)
    names = {"LSTM": ("i", "f", "o", "g", "c", "h"), "GRU": ("z", "r", "n", "h"),
             "RNN": ("h",)}[node.op]  # fmt: skip
    out = {k: np.zeros((n_steps, hid)) for k in names}
    h = h0.astype(np.float64)
    c = c0.astype(np.float64) if c0 is not None else np.zeros(hid)
    order = range(n_steps - 1, -1, -1) if d else range(n_steps)
    for t in order:
        xw = w @ x[t] + wb
        if node.op == "RNN":
            h = np.tanh(xw + r @ h + rb)
        elif node.op == "GRU":
            z = sigmoid(xw[:hid] + r[:hid] @ h + rb[:hid])
            rr = sigmoid(xw[hid : 2 * hid] + r[hid : 2 * hid] @ h + rb[hid : 2 * hid])
            if node.attrs.get("linear_before_reset", 0):
                n = np.tanh(xw[2 * hid :] + rr * (r[2 * hid :] @ h + rb[2 * hid :]))
            else:
                n = np.tanh(xw[2 * hid :] + r[2 * hid :] @ (rr * h) + rb[2 * hid :])
            h = (1.0 - z) * n + z * h
            out["z"][t], out["r"][t], out["n"][t] = z, rr, n
        else:
            gates = xw + r @ h + rb
            p = node.P[d].astype(np.float64) if node.P is not None else np.zeros(3 * hid)
            p_i, p_o, p_f = p[:hid], p[hid : 2 * hid], p[2 * hid :]
            i = sigmoid(gates[:hid] + p_i * c)
            if node.attrs.get("input_forget", 0):
                f = 1.0 - i
            else:
                f = sigmoid(gates[2 * hid : 3 * hid] + p_f * c)
            cand = np.tanh(gates[3 * hid :])
            c = f * c + i * cand
            o = sigmoid(gates[hid : 2 * hid] + p_o * c)
            h = o * np.tanh(c)
            out["i"][t], out["f"][t], out["o"][t], out["g"][t], out["c"][t] = i, f, o, cand, c
        out["h"][t] = h
    return out


@dataclass
class Trace:
    """The per-step record of one sequence."""

    model: str
    steps: list[str]
    labels: list[str]
    probs: np.ndarray  # (T, C)
    gates: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # layer -> gate -> (T, H)
    checks: dict[str, float] = field(default_factory=dict)  # what was compared -> max |diff|

    def to_dict(self) -> dict[str, Any]:
        pred = self.probs.argmax(-1)
        return {
            "model": self.model,
            "tolerance": TOLERANCE,
            "max_diff_vs_onnxruntime": self.checks,
            "labels": self.labels,
            "steps": [
                {
                    "index": t,
                    "input": s,
                    "predicted": self.labels[int(pred[t])],
                    "probability": round(float(self.probs[t, pred[t]]), 6),
                    "probs": np.round(self.probs[t], 6).tolist(),
                }
                for t, s in enumerate(self.steps)
            ],
            "activations": {
                layer: {g: np.round(v, 6).tolist() for g, v in gates.items()}
                for layer, gates in self.gates.items()
            },
        }


def _exposed_session(proto: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """onnxruntime on `proto` with these intermediate values added as graph outputs."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    have = {o.name for o in proto.graph.output}
    for name in names:
        if name and name not in have:
            value = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            proto.graph.output.append(value)
            have.add(name)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _name_unnamed_outputs(nodes: list[RecurrentNode], proto: onnx.ModelProto) -> None:
    """Give an unused Y / Y_h output a name so onnxruntime can return it."""
    graph_nodes = [n for n in proto.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    for node, graph_node in zip(nodes, graph_nodes, strict=True):
        while len(graph_node.output) < 2:
            graph_node.output.append("")
        for k in range(2):
            if not graph_node.output[k]:
                graph_node.output[k] = f"trace_{node.index}_out{k}"
        node.outputs = list(graph_node.output)


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _record(trace: Trace, key: str, value: float) -> None:
    trace.checks[key] = max(trace.checks.get(key, 0.0), value)


def trace_ours(
    proto: onnx.ModelProto, desc: ModelDescription, x: np.ndarray, steps: list[str]
) -> Trace:
    """Our export: the whole graph in numpy, checked against onnxruntime's h and probs."""
    values = constants(proto)
    arch = desc.architecture
    from export.inspect_cmd import _other_recurrent_ops

    needed = ["head_weight_t", "head_bias"]
    needed += ["embedding"] if desc.input_kind == "tokens" else ["feature_mean", "feature_inv_std"]
    missing = [k for k in needed if k not in values]
    if missing or (arch.get("cell") != "jordan" and not recurrent_nodes(proto)):
        raise ValueError(
            f"{desc.name}: not a float export of export/onnx_export.py (missing "
            f"{missing or 'LSTM / GRU / RNN nodes'}){_other_recurrent_ops(proto)}"
        )
    if desc.input_kind == "tokens":
        y = values["embedding"][x].astype(np.float64)  # (T, E)
    else:
        y = (x - values["feature_mean"]) * values["feature_inv_std"]
    n_cls = len(desc.labels)
    trace = Trace(str(desc.name), steps, list(desc.labels), np.zeros((len(x), n_cls)))
    feeds = {desc.input_name: x[None], "lengths": np.array([len(x)], np.int64),
             "state": np.zeros((1, desc.state_rows, desc.hidden_size), np.float32)}  # fmt: skip
    if arch.get("cell") == "jordan":
        from export.jordan import B_H, H_SEQUENCE, HEAD_B, HEAD_W, W_XH, W_YH

        sess = _exposed_session(proto, [H_SEQUENCE])
        ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds),
                           strict=True))  # fmt: skip
        u = y @ values[W_XH] + values[B_H]
        prev = np.zeros(n_cls)
        hs = np.zeros((len(x), values[W_XH].shape[1]))
        for t in range(len(x)):
            hs[t] = np.tanh(u[t] + prev @ values[W_YH])
            prev = softmax(hs[t] @ values[HEAD_W] + values[HEAD_B])
            trace.probs[t] = prev
        trace.gates["jordan"] = {"h": hs, "y_prev": np.vstack([np.zeros(n_cls), trace.probs[:-1]])}
        _record(trace, "h", _diff(hs, ort_out[H_SEQUENCE][:, 0]))
    else:
        nodes = recurrent_nodes(proto)
        sess = _exposed_session(proto, [n.outputs[0] for n in nodes])
        ort_out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds),
                           strict=True))  # fmt: skip
        for node in nodes:
            _check_default_activations(node)
            per_dir = []
            for d in range(node.directions):
                zero = np.zeros(node.hidden)
                gates = run_direction(node, y, d, zero, zero if node.op == "LSTM" else None)
                key = f"layer{node.index}.{('fwd', 'bwd')[d]}"
                trace.gates[key] = gates
                _record(trace, "h", _diff(gates["h"], ort_out[node.outputs[0]][:, d, 0]))
                per_dir.append(gates["h"])
            y = np.concatenate(per_dir, axis=-1)
        trace.probs = softmax(y @ values["head_weight_t"] + values["head_bias"])
    _record(trace, "step_probs", _diff(trace.probs, ort_out["step_probs"][0]))
    return trace


def _generic_feeds(sess: ort.InferenceSession, seq_name: str, x: np.ndarray) -> dict:
    """The sequence as a batch of one; every other input (states) zeros, lengths = T."""
    feeds: dict[str, np.ndarray] = {}
    for inp in sess.get_inputs():
        dtype = np.int64 if "int64" in inp.type else np.int32 if "int32" in inp.type else np.float32
        if inp.name == seq_name:
            feeds[inp.name] = x[None].astype(dtype)
        elif inp.name in ("lengths", "sequence_lens"):
            feeds[inp.name] = np.array([len(x)], dtype)
        else:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in inp.shape]
            feeds[inp.name] = np.zeros(shape, dtype)
    return feeds


def trace_generic(
    proto: onnx.ModelProto, folder: Path | None, x: np.ndarray, steps: list[str]
) -> Trace:
    """A model of your own: each recurrent node in numpy from onnxruntime's X and initial state."""
    nodes = recurrent_nodes(proto)
    if not nodes:
        raise ValueError("the graph has no native LSTM / GRU / RNN node to trace")
    _name_unnamed_outputs(nodes, proto)
    exposed = [name for n in nodes for name in (n.inputs[0], n.inputs[5], n.inputs[6],
                                                n.outputs[0])]  # fmt: skip
    sess = _exposed_session(proto, exposed)
    triton = None
    if folder is not None:
        from service.tritonconfig import load_triton_config

        triton = load_triton_config(folder)
    seq_name = triton.inputs[0].name if triton else sess.get_inputs()[0].name
    out_name = triton.outputs[0].name if triton else sess.get_outputs()[0].name
    ort_out = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, _generic_feeds(sess, seq_name, x)), strict=True))  # fmt: skip
    out = np.asarray(ort_out[out_name], np.float64)  # batch of one: per step or final only
    raw = _per_step_output(sess, seq_name, x, out, out_name)  # (T, C)
    kind = (triton.output_kind if triton else None) or output_kind(
        parse_model(proto.SerializeToString()), out_name, np.ndim(ort_out[out_name])
    )[0]  # as the server takes the outputs (service/engine/byo/inferred.py)
    probs = {"logits": softmax, "probs": lambda v: v, "log_probs": np.exp}.get(kind, softmax)(raw)
    labels = triton.labels(triton.outputs[0], raw.shape[1]) if triton else None
    labels = list(labels or [f"class_{c}" for c in range(raw.shape[1])])
    trace = Trace(str(folder.name if folder else "model"), steps, labels, probs)
    for node in nodes:
        _check_default_activations(node)
        x_in = np.asarray(ort_out[node.inputs[0]], np.float64)  # (T, 1, I)
        if x_in.shape[1] != 1:
            raise ValueError(f"{node.name}: expected time-major X (T, 1, I), got {x_in.shape}")
        for d in range(node.directions):
            h0 = ort_out[node.inputs[5]][d, 0] if node.inputs[5] else np.zeros(node.hidden)
            c0 = None
            if node.op == "LSTM":
                c0 = ort_out[node.inputs[6]][d, 0] if node.inputs[6] else np.zeros(node.hidden)
            gates = run_direction(node, x_in[:, 0], d, h0, c0)
            trace.gates[f"layer{node.index}.{('fwd', 'bwd')[d]}"] = gates
            _record(trace, "h", _diff(gates["h"], ort_out[node.outputs[0]][:, d, 0]))
    return trace


def _per_step_output(
    sess: ort.InferenceSession, seq_name: str, x: np.ndarray, out: np.ndarray, out_name: str
) -> np.ndarray:
    """The output at every step (T, C): as computed when it has a time axis; for a final-only
    output (one row of C for the whole sequence), the graph's answer on each prefix x[:t]."""
    n_cls = out.shape[-1]
    if out.size == len(x) * n_cls:
        return out.reshape(len(x), n_cls)
    if out.size != n_cls:
        raise ValueError(f"output {out_name!r} of shape {out.shape} is neither one row per "
                         f"step nor one row for the sequence (T={len(x)})")  # fmt: skip
    prefixes = [sess.run([out_name], _generic_feeds(sess, seq_name, x[:t]))[0]
                for t in range(1, len(x))]  # fmt: skip
    return np.stack([np.asarray(r, np.float64).reshape(n_cls) for r in [*prefixes, out]])


def read_frames(path: Path) -> np.ndarray:
    """Frames, one per line, comma- or whitespace-separated numbers."""
    rows = [line.replace(",", " ").split() for line in path.read_text().splitlines()]
    rows = [r for r in rows if r]
    try:
        return np.array([[float(v) for v in r] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise ValueError(f"--frames {str(path)[:64]!r}: not rows of numbers ({exc})") from exc


def sequence_for(
    model_file: Path, desc: ModelDescription | None, text: str | None, frames: Path | None,
    tokens: str | None,
) -> tuple[np.ndarray, list[str]]:  # fmt: skip
    """The input to trace and its per-step labels (characters, tokens or frame indices)."""
    if frames is not None:
        x = read_frames(frames)
        return x, [str(t) for t in range(len(x))]
    if tokens is not None:
        try:
            ids = [int(v) for v in tokens.replace(",", " ").split()]
        except ValueError as exc:
            raise ValueError(f"--tokens must be integers, got {tokens[:64]!r}") from exc
        return np.array(ids, np.int64), [str(i) for i in ids]
    assert text is not None
    if desc is not None and desc.tokenizer is not None:
        normalized = desc.tokenizer.normalize(text)
        return np.array(desc.tokenizer.encode_normalized(normalized), np.int64), list(normalized)
    folder = config_dir(model_file)
    if folder is not None:
        from service.engine.byo.tritonconfig import read_vocabulary
        from service.tritonconfig import load_triton_config

        vocab = read_vocabulary(load_triton_config(folder))
        if vocab is not None:
            chars, lower = vocab
            norm = text.lower() if lower else text
            index = {ch: i for i, ch in enumerate(chars) if i}
            return np.array([index.get(ch, 0) for ch in norm], np.int64), list(norm)
    raise ValueError("--text needs a tokenizer (in the description or a config.pbtxt "
                     "vocab_filename); give --tokens IDS instead")  # fmt: skip


def trace_model(
    path: Path, text: str | None = None, frames: Path | None = None, tokens: str | None = None
) -> Trace:
    """Trace one sequence; TraceMismatch if numpy and onnxruntime differ beyond 1e-5."""
    model_file = resolve_model(path)
    proto = onnx.load(str(model_file))
    meta = {p.key: p.value for p in proto.metadata_props}
    desc = ModelDescription.from_metadata(meta) if DESCRIPTION_KEY in meta else None
    x, steps = sequence_for(model_file, desc, text, frames, tokens)
    if len(x) == 0:
        raise ValueError("the sequence is empty")
    if desc is not None:
        trace = trace_ours(proto, desc, x, steps)
    else:
        trace = trace_generic(proto, config_dir(model_file), x, steps)
    worst = max(trace.checks.values())
    if not np.isfinite(worst) or worst > TOLERANCE:
        raise TraceMismatch(f"numpy vs onnxruntime differ by {trace.checks} (> {TOLERANCE})")
    return trace


def plot_trace(trace: Trace, path: Path) -> None:
    """One heatmap per gate (units x steps), characters / frames on the time axis, the
    prediction and its probability above each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(layer, g, v) for layer, gates in trace.gates.items() for g, v in gates.items()]
    n_steps = len(trace.steps)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.55 * n_steps + 2.5),
                                                      1.6 * len(panels) + 1.2),
                             squeeze=False, sharex=True)  # fmt: skip
    pred = trace.probs.argmax(-1)
    for ax, (layer, gate, value) in zip(axes[:, 0], panels, strict=True):
        bounded = gate != "c"  # an LSTM's cell state is unbounded: its own colour scale
        lo, hi = (-1.0, 1.0) if gate in ("h", "g", "n") else (0.0, 1.0)
        image = ax.imshow(value.T, aspect="auto", interpolation="nearest", cmap="coolwarm",
                          vmin=lo if bounded else None, vmax=hi if bounded else None)  # fmt: skip
        ax.set_ylabel(f"{layer}\n{gate}", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_yticks([])
        fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    top = axes[0, 0]
    for t in range(n_steps):
        top.annotate(f"{trace.labels[int(pred[t])]}\n{trace.probs[t, pred[t]]:.2f}",
                     (t, -0.5), xytext=(0, 4), textcoords="offset points", ha="center",
                     va="bottom", fontsize=7, annotation_clip=False)  # fmt: skip
    bottom = axes[-1, 0]
    bottom.set_xticks(range(n_steps))
    bottom.set_xticklabels([s if s.strip() else "␣" for s in trace.steps], fontsize=9)
    bottom.set_xlabel("step")
    fig.suptitle(f"{trace.model}: gate activations per step and unit", y=1.0, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=72, bbox_inches="tight")
    plt.close(fig)


def write_trace(trace: Trace, out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "trace.json", "png": out / "trace.png"}
    files["json"].write_text(json.dumps(trace.to_dict(), ensure_ascii=False))
    plot_trace(trace, files["png"])
    return {k: str(v) for k, v in files.items()}
