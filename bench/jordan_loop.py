"""The Jordan network's time loop in onnxruntime: the shipped `Scan` graph against the same cell
as a `Loop` body (the body Gathers step t of the input projection), same weights, outputs checked
identical. `python -m bench.jordan_loop` (one intra-op thread, CPU provider)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from export.jordan import HEAD_B, HEAD_W, W_YH

MODEL = Path(__file__).resolve().parent.parent / "models/speaker-vowels-jordan/1/model.onnx"


def loop_variant(proto: onnx.ModelProto, hidden: int, classes: int) -> onnx.ModelProto:
    """`proto` with its Scan replaced by an equivalent Loop."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    g = proto.graph
    scan = next(n for n in g.node if n.op_type == "Scan")
    f, b = TensorProto.FLOAT, TensorProto.BOOL
    nodes = [
        helper.make_node("Gather", ["u", "i"], ["u_t"], axis=0),
        helper.make_node("Gather", ["valid_tb1", "i"], ["valid_t"], axis=0),
        helper.make_node("MatMul", ["y_prev", W_YH], ["r"]),
        helper.make_node("Add", ["u_t", "r"], ["a"]),
        helper.make_node("Tanh", ["a"], ["h_t"]),
        helper.make_node("MatMul", ["h_t", HEAD_W], ["hw"]),
        helper.make_node("Add", ["hw", HEAD_B], ["logit"]),
        helper.make_node("Softmax", ["logit"], ["p_t"], axis=-1),
        helper.make_node("Where", ["valid_t", "p_t", "y_prev"], ["y_next"]),
        helper.make_node("Identity", ["cond"], ["cond_out"]),
    ]
    body = helper.make_graph(
        nodes, "jordan_loop_body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", b, []),
         helper.make_tensor_value_info("y_prev", f, ["B", classes])],
        [helper.make_tensor_value_info("cond_out", b, []),
         helper.make_tensor_value_info("y_next", f, ["B", classes]),
         helper.make_tensor_value_info("p_t", f, ["B", classes]),
         helper.make_tensor_value_info("h_t", f, ["B", hidden])],
    )  # fmt: skip
    g.initializer.append(onnx.numpy_helper.from_array(np.array(True), "loop_true"))
    loop = helper.make_node("Loop", ["t_len", "loop_true", "y0"], list(scan.output), body=body,
                            name="jordan_loop")  # fmt: skip
    index = list(g.node).index(scan)
    del g.node[index]
    g.node.insert(index, loop)
    onnx.checker.check_model(proto)
    return proto


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _microseconds(sess: ort.InferenceSession, feeds: dict, seconds: float) -> float:
    for _ in range(20):
        sess.run(None, feeds)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        sess.run(None, feeds)
        runs += 1
    return (time.perf_counter() - start) / runs * 1e6


def main(seconds: float = 1.0) -> None:
    scan_proto = onnx.load(str(MODEL))
    inits = {t.name: t for t in scan_proto.graph.initializer}
    hidden, classes = (int(d) for d in inits[W_YH].dims[::-1])
    scan, loop = _session(scan_proto), _session(loop_variant(scan_proto, hidden, classes))
    rng = np.random.default_rng(0)
    for batch, steps in ((1, 1), (1, 29), (32, 29), (256, 29), (64, 200)):
        feeds = {
            "features": rng.normal(size=(batch, steps, 12)).astype(np.float32),
            "lengths": np.full(batch, steps, np.int64),
            "state": np.zeros((batch, 1, classes), np.float32),
        }
        pairs = zip(scan.run(None, feeds), loop.run(None, feeds), strict=True)
        same = all(np.array_equal(a, b) for a, b in pairs)
        s, lo = _microseconds(scan, feeds, seconds), _microseconds(loop, feeds, seconds)
        print(f"B={batch:4d} T={steps:4d}  Scan {s:8.1f} us  Loop {lo:8.1f} us  "
              f"Loop/Scan {lo / s:.2f}  identical={same}")  # fmt: skip


if __name__ == "__main__":
    main()
