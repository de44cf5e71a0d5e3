"""Checks that an exported model keeps the v1 contract (tolerance 1e-5 on probabilities, and on
states as `state_diff` measures them):
- PyTorch and onnxruntime agree (the torch model is rebuilt from the ONNX initializers, so the
  check covers the gate reordering, the state layout and the graph semantics);
- streaming: a sequence fed in chunks, each call's state_out passed on, equals one whole call;
- padding: a batch with mixed lengths gives each row exactly what it gets alone.
An int8 copy (`lstm-export quantize`) gets the same checks on its probabilities, at the looser
tolerances its description states (INT8_TOLERANCE, INT8_MEAN_TOLERANCE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from export.arch import ArchConfig
from export.int8 import dequantized_initializers, quantization_of
from export.model import RecurrentClassifier
from export.onnx_export import reorder_gates
from export.outputs import output_kind_problem
from lstmserve.contract import ModelDescription
from service.engine.byo.tritonconfig import CONFIG_FILE

TOLERANCE = 1e-5
FLOOR_FACTOR = 4.0
# What verify accepts of an int8 model, on probabilities (step_probs and probs): the worst case
# and the mean over cases. Measured (`lstm-export verify`, seed 0): langid-chars-int8 max 0.11
# (streaming, 30 random steps), worst mean 0.023; speaker-vowels-int8 max 0.008; tiny models
# max 0.02. A wiring bug (the recurrent node ignoring its initial state) gives means of 0.13 to
# 0.5 on the same models: tests/e2e/test_quantize.py checks that verify fails it.
INT8_TOLERANCE = 0.25
INT8_MEAN_TOLERANCE = 0.05


def open_session(path: str | Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def torch_from_onnx(path: str | Path) -> tuple[RecurrentClassifier, ModelDescription]:
    """Rebuild the PyTorch model from an exported file's initializers and description."""
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    desc = ModelDescription.from_metadata(meta)
    arch = ArchConfig.from_dict(desc.architecture)
    if desc.training.get("quantization"):  # an int8 copy: its weights, dequantized
        arrays = dequantized_initializers(proto)
    else:
        arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    inits = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    if arch.cell == "jordan":  # a Scan graph, not native recurrent nodes
        from export.jordan import jordan_from_initializers

        arrays = {k: v.numpy() for k, v in inits.items()}
        return jordan_from_initializers(arch, arrays), desc  # type: ignore[return-value]
    model = RecurrentClassifier(arch).eval()
    hid = arch.hidden_size
    with torch.no_grad():
        if arch.input_kind == "tokens":
            model.embedding.weight.copy_(inits["embedding"])
        else:
            model.set_normalization(inits["feature_mean"], 1.0 / inits["feature_inv_std"])
        for index, layer in enumerate(model.layers):
            for d in range(arch.directions):
                p = layer.direction_params(d)
                w, r, b = (inits[f"l{index}_{k}"][d].numpy() for k in "WRB")
                gh = b.shape[0] // 2
                p["w_ih"].copy_(torch.from_numpy(reorder_gates(w, arch.cell, hid, to_onnx=False)))
                p["w_hh"].copy_(torch.from_numpy(reorder_gates(r, arch.cell, hid, to_onnx=False)))
                p["b_ih"].copy_(
                    torch.from_numpy(reorder_gates(b[:gh], arch.cell, hid, to_onnx=False))
                )
                p["b_hh"].copy_(
                    torch.from_numpy(reorder_gates(b[gh:], arch.cell, hid, to_onnx=False))
                )
                if arch.peephole:
                    p_i, p_o, p_f = inits[f"l{index}_P"][d].split(hid)
                    p["peephole"].copy_(torch.cat([p_i, p_f, p_o]))
        model.head.weight.copy_(inits["head_weight_t"].T)
        model.head.bias.copy_(inits["head_bias"])
    return model, desc


def random_inputs(
    desc: ModelDescription, rng: np.random.Generator, batch: int, t_max: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, lengths (1..t_max, t_max included), and a random non-zero state."""
    if desc.input_kind == "tokens":
        x = rng.integers(0, desc.vocab_size, size=(batch, t_max), dtype=np.int64)
    else:
        x = rng.normal(size=(batch, t_max, desc.feature_dim)).astype(np.float32)
    lengths = rng.integers(1, t_max + 1, size=batch, dtype=np.int64)
    lengths[0] = t_max
    state = rng.normal(scale=0.5, size=(batch, desc.state_rows, desc.hidden_size))
    return x, lengths, state.astype(np.float32)


def run_onnx(
    sess: ort.InferenceSession, desc: ModelDescription, x: np.ndarray, lengths: np.ndarray,
    state: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    step_probs, probs, state_out = sess.run(
        None, {desc.input_name: x, "lengths": lengths, "state": state}
    )
    return step_probs, probs, state_out


def state_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b| / max(1, |b|): the absolute difference for values within [-1, 1] (every h,
    every GRU / RNN state), relative beyond, for an LSTM's unbounded cell state c, whose
    float32 spacing alone is ~1e-6 at |c| = 10."""
    return float((np.abs(a - b) / np.maximum(1.0, np.abs(b))).max())


def _valid_mask(lengths: np.ndarray, t_max: int) -> np.ndarray:
    return np.arange(t_max)[None, :] < lengths[:, None]  # (B, T)


def _parity_case(
    model: RecurrentClassifier, sess: ort.InferenceSession, desc: ModelDescription,
    rng: np.random.Generator, batch: int, t_max: int,
) -> tuple[float, float]:  # fmt: skip
    """(|torch - onnxruntime|, |torch float32 - torch float64|) on one random case: the
    difference, and float32's own rounding noise on the same inputs (the noise floor)."""
    x, lengths, state = random_inputs(desc, rng, batch, t_max)
    args = (torch.from_numpy(x), torch.from_numpy(lengths))
    with torch.no_grad():
        ref = model.contract_forward(*args, torch.from_numpy(state))
        exact = model.double().contract_forward(*args, torch.from_numpy(state).double())
    model.float()
    out = run_onnx(sess, desc, x, lengths, state)
    mask = _valid_mask(lengths, t_max)

    def diff(a: tuple, b: tuple) -> float:  # type: ignore[type-arg]
        return max(
            float(np.abs(a[0] - b[0])[mask].max()),
            float(np.abs(a[1] - b[1]).max()),
            state_diff(a[2], b[2]),
        )

    ref_np = tuple(r.numpy() for r in ref)
    return diff(ref_np, out), diff(ref_np, tuple(e.numpy() for e in exact))


def torch_parity(
    model: RecurrentClassifier, sess: ort.InferenceSession, desc: ModelDescription,
    rng: np.random.Generator, batch: int, t_max: int,
) -> float:  # fmt: skip
    """Max |torch - onnxruntime| over valid step_probs, probs and state_out."""
    return _parity_case(model, sess, desc, rng, batch, t_max)[0]


def streaming_diff(
    sess: ort.InferenceSession, desc: ModelDescription, x: np.ndarray, state: np.ndarray,
    chunks: list[int],
) -> float:  # fmt: skip
    """One row fed in `chunks` (sizes summing to its length) vs one call on the whole row."""
    t_max = x.shape[0]
    assert sum(chunks) == t_max and all(c >= 1 for c in chunks)
    whole = run_onnx(sess, desc, x[None], np.array([t_max]), state[None])
    steps, st, pos, probs = [], state[None], 0, None
    for size in chunks:
        sp, probs, st = run_onnx(sess, desc, x[None, pos : pos + size], np.array([size]), st)
        steps.append(sp[0])
        pos += size
    assert probs is not None
    return float(
        max(
            np.abs(np.concatenate(steps) - whole[0][0]).max(),
            np.abs(probs - whole[1]).max(),
            state_diff(st, whole[2]),
        )
    )


def padding_diff(
    sess: ort.InferenceSession, desc: ModelDescription, rng: np.random.Generator, batch: int,
    t_max: int,
) -> float:  # fmt: skip
    """A batch with mixed lengths vs each row alone at its own length."""
    x, lengths, state = random_inputs(desc, rng, batch, t_max)
    together = run_onnx(sess, desc, x, lengths, state)
    worst = 0.0
    for b in range(batch):
        n = int(lengths[b])
        alone = run_onnx(sess, desc, x[b : b + 1, :n], lengths[b : b + 1], state[b : b + 1])
        worst = max(
            worst,
            float(np.abs(alone[0][0] - together[0][b, :n]).max()),
            float(np.abs(alone[1][0] - together[1][b]).max()),
            state_diff(alone[2][0], together[2][b]),
        )
    return worst


def random_chunks(rng: np.random.Generator, total: int) -> list[int]:
    """A random split of `total` steps into chunks of 1..total steps, 1-step chunks common."""
    chunks, left = [], total
    while left:
        size = 1 if rng.random() < 0.4 else int(rng.integers(1, left + 1))
        size = min(size, left)
        chunks.append(size)
        left -= size
    return chunks


@dataclass
class VerifyReport:
    model: str
    torch_parity: float = 0.0
    streaming: float | None = None
    padding: float = 0.0
    cases: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    float32_floor: float = 0.0
    tolerance: float = TOLERANCE  # looser for float16 states or outputs, and for int8 weights
    problem: str = ""  # a check that is not a difference (a config.pbtxt model's output kind)

    @property
    def parity_tolerance(self) -> float:
        """1e-5, or FLOOR_FACTOR x float32's own noise on the same cases if that is larger:
        torch and onnxruntime round differently, each about as far from the exact result as
        the floor, so they may differ by twice it. An export bug (a gate out of order, a wrong
        state row) shows as ~1e-1."""
        return max(self.tolerance, FLOOR_FACTOR * self.float32_floor)

    @property
    def passed(self) -> bool:
        exact = max(self.padding, self.streaming or 0.0) <= self.tolerance
        return exact and self.torch_parity <= self.parity_tolerance and not self.problem

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "max_diff_torch_vs_onnxruntime": self.torch_parity,
            "float32_noise_floor": self.float32_floor,
            "parity_tolerance": self.parity_tolerance,
            "max_diff_streaming_vs_whole": self.streaming,
            "max_diff_padded_batch_vs_alone": self.padding,
            "cases": self.cases,
            "tolerance": self.tolerance,
            "passed": self.passed,
            **({"problem": self.problem} if self.problem else {}),
            **self.extra,
        }


def verify_model(path: str | Path, seed: int = 0) -> VerifyReport:
    """All contract checks on one exported model file, on random inputs."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
    if (path.parent.parent / CONFIG_FILE).is_file():
        return verify_generic(path, seed)
    model, desc = torch_from_onnx(path)
    if desc.training.get("quantization"):  # int8: its own checks, at its stated tolerance
        return verify_quantized(path, model, desc, seed)
    sess = open_session(path)
    rng = np.random.default_rng(seed)
    report = VerifyReport(model=f"{desc.name}/{desc.version}")
    for batch in (1, 3, 8):
        for t_max in (1, 5, 17):
            diff, floor = _parity_case(model, sess, desc, rng, batch, t_max)
            report.torch_parity = max(report.torch_parity, diff)
            report.float32_floor = max(report.float32_floor, floor)
            report.padding = max(report.padding, padding_diff(sess, desc, rng, batch, t_max))
            report.cases += 1
    if desc.streamable:
        report.streaming = 0.0
        for t_max in (1, 2, 9, 30):
            x, _, state = random_inputs(desc, rng, 1, t_max)
            for chunks in ([1] * t_max, random_chunks(rng, t_max), random_chunks(rng, t_max)):
                diff = streaming_diff(sess, desc, x[0], state[0], chunks)
                report.streaming = max(report.streaming, diff)
                report.cases += 1
    return report


# -- a model of the user's own, with a config.pbtxt ---------------------------------------------

FLOAT16_TOLERANCE = 2e-3


def verify_generic(path: Path, seed: int = 0) -> VerifyReport:
    """The streaming and batching checks on a config.pbtxt model, through the adapter the server
    runs it with (service/engine/byo/generic.py): streaming == whole sequence, and a batch == each
    row alone (mixed lengths with a lengths input, equal lengths without one); and the outputs
    fit the kind the server takes them to be (export/outputs.py). There is no PyTorch twin to
    compare with: the user's own export is checked against itself."""
    from service.engine.byo.generic import GenericRuntime
    from service.tritonconfig import load_triton_config

    runtime = GenericRuntime(
        path, load_triton_config(path.parent.parent), ("CPUExecutionProvider",)
    )
    desc, binding = runtime.description, runtime.binding
    rng = np.random.default_rng(seed)
    window = binding.window or 1
    half = any(s.spec.dtype == np.float16 for s in binding.states) or any(
        o is not None and o.dtype == np.float16 for o in (binding.step_output, binding.final_output)
    )
    report = VerifyReport(model=f"{desc.name}/{desc.version}", streaming=0.0)
    report.tolerance = FLOAT16_TOLERANCE if half else TOLERANCE
    report.extra = {
        "config": str(path.parent.parent / CONFIG_FILE),
        "output_kind": desc.output_kind,  # what the server takes the outputs to be, and why
        "output_kind_rule": desc.output_kind_rule,
        "batch_check": "mixed lengths" if binding.lengths else "equal lengths (no lengths input)",
        "max_diff_torch_vs_onnxruntime": None,  # not checked: no PyTorch twin of a user's model
    }
    for batch in (1, 3, 8):
        for t_max in (1, 5, 17):
            diff = _runtime_batch_diff(runtime, rng, batch, t_max * window)
            report.padding = max(report.padding, diff)
            report.cases += 1
    for t_max in (1, 2, 9, 30):
        x, _, state = random_inputs(desc, rng, 1, t_max * window)
        for chunks in ([1] * t_max, random_chunks(rng, t_max), random_chunks(rng, t_max)):
            sizes = [c * window for c in chunks]
            diff = _runtime_streaming_diff(runtime, x[0], state[0], sizes)
            report.streaming = max(report.streaming, diff)
            report.cases += 1
    x, lengths, state = random_inputs(desc, rng, 8, 5 * window)
    if binding.lengths is None:
        lengths[:] = 5 * window
    out = runtime.run(x, lengths, state)  # the outputs as the model computes them
    valid = [out.step_probs[b, : int(n)] for b, n in enumerate(lengths)]
    report.problem = output_kind_problem(desc.output_kind, [out.probs, *valid], half)
    return report


def _runtime_batch_diff(runtime: Any, rng: np.random.Generator, batch: int, t_max: int) -> float:
    """A batch vs each row alone at its own length, through the server's adapter."""
    x, lengths, state = random_inputs(runtime.description, rng, batch, t_max)
    if runtime.binding.lengths is None:
        lengths[:] = t_max  # a model without lengths is batched at one length only
    together = runtime.run(x, lengths, state)
    worst = 0.0
    for b in range(batch):
        n = int(lengths[b])
        alone = runtime.run(x[b : b + 1, :n], lengths[b : b + 1], state[b : b + 1])
        worst = max(
            worst,
            float(np.abs(alone.step_probs[0] - together.step_probs[b, :n]).max()),
            float(np.abs(alone.probs[0] - together.probs[b]).max()),
            state_diff(alone.state_out[0], together.state_out[b]),
        )
    return worst


def _runtime_streaming_diff(runtime: Any, x: np.ndarray, state: np.ndarray,
                            chunks: list[int]) -> float:  # fmt: skip
    """One row fed in `chunks`, each run's state passed on, vs one run on the whole row."""
    t_max = x.shape[0]
    whole = runtime.run(x[None], np.array([t_max]), state[None])
    steps, st, pos, probs = [], state[None], 0, None
    for size in chunks:
        out = runtime.run(x[None, pos : pos + size], np.array([size]), st)
        steps.append(out.step_probs[0])
        probs, st = out.probs, out.state_out
        pos += size
    assert probs is not None
    return float(
        max(
            np.abs(np.concatenate(steps) - whole.step_probs[0]).max(),
            np.abs(probs - whole.probs).max(),
            state_diff(st, whole.state_out),
        )
    )


# -- an int8 copy (lstm-export quantize) --------------------------------------------------------


@dataclass
class Int8VerifyReport(VerifyReport):
    """verify's report for an int8 model: the maxima are of probabilities (step_probs, probs),
    gated at `tolerance`, their means over cases at `mean_tolerance`; the states' differences
    (state_diff) are reported, not gated: int8 noise walks h and c away over a long
    sequence (0.2 to 1.5 after 30 random steps) while the answers stay close, and a state that
    is wrong shows in the probabilities of the steps after it."""

    mean_tolerance: float = INT8_MEAN_TOLERANCE
    means: dict[str, list[float]] = field(default_factory=dict)
    states: dict[str, float] = field(default_factory=dict)

    def add(self, check: str, probs: float, state: float) -> None:
        self.means.setdefault(check, []).append(probs)
        self.states[check] = max(self.states.get(check, 0.0), state)
        self.cases += 1

    def mean(self, check: str) -> float:
        return float(np.mean(self.means[check])) if self.means.get(check) else 0.0

    @property
    def passed(self) -> bool:
        worst_mean = max((self.mean(k) for k in self.means), default=0.0)
        worst = max(self.padding, self.streaming or 0.0, self.torch_parity)
        return worst <= self.tolerance and worst_mean <= self.mean_tolerance

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {
            "compared": "probabilities (step_probs, probs); states reported, not gated",
            "parity_tolerance": self.tolerance, "mean_tolerance": self.mean_tolerance,
            "mean_diff": {k: self.mean(k) for k in self.means},
            "max_state_diff": dict(self.states), "passed": self.passed,
        }  # fmt: skip


def _diffs(
    a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], mask: np.ndarray
) -> tuple[float, float]:
    """(max |diff| of valid step_probs and probs, state_diff of the states)."""
    probs = max(float(np.abs(a[0] - b[0])[mask].max()), float(np.abs(a[1] - b[1]).max()))
    return probs, state_diff(a[2], b[2])


def verify_quantized(
    path: Path, model: Any, desc: ModelDescription, seed: int = 0
) -> Int8VerifyReport:
    """verify's three checks on an int8 model, on the same random cases: PyTorch with the
    dequantized weights vs onnxruntime, a padded batch vs each row alone, streaming vs whole."""
    sess, rng = open_session(path), np.random.default_rng(seed)
    entry = quantization_of(desc) or {}
    report = Int8VerifyReport(model=f"{desc.name}/{desc.version}")
    report.tolerance = float(entry.get("tolerance", INT8_TOLERANCE))
    report.mean_tolerance = float(entry.get("mean_tolerance", INT8_MEAN_TOLERANCE))
    for batch in (1, 3, 8):
        for t_max in (1, 5, 17):
            x, lengths, state = random_inputs(desc, rng, batch, t_max)
            with torch.no_grad():
                ref = model.contract_forward(*(torch.from_numpy(a) for a in (x, lengths, state)))
            out = run_onnx(sess, desc, x, lengths, state)
            mask = np.arange(t_max)[None, :] < lengths[:, None]
            probs, st = _diffs(tuple(r.numpy() for r in ref), out, mask)
            report.torch_parity = max(report.torch_parity, probs)
            report.add("torch_vs_onnxruntime", probs, st)
            for b in range(batch):
                n = int(lengths[b])
                alone = run_onnx(sess, desc, x[b : b + 1, :n], lengths[b : b + 1], state[b : b + 1])
                row = tuple(o[b : b + 1, :n] if i == 0 else o[b : b + 1] for i, o in enumerate(out))
                probs, st = _diffs(alone, row, np.ones((1, n), dtype=bool))
                report.padding = max(report.padding, probs)
                report.add("padded_batch_vs_alone", probs, st)
    if desc.streamable:
        report.streaming = 0.0
        for t_max in (1, 2, 9, 30):
            x, _, state = random_inputs(desc, rng, 1, t_max)
            whole = run_onnx(sess, desc, x, np.array([t_max]), state)
            for chunks in ([1] * t_max, random_chunks(rng, t_max), random_chunks(rng, t_max)):
                steps, st_in, pos = [], state, 0
                for size in chunks:
                    sp, probs_out, st_in = run_onnx(
                        sess, desc, x[:, pos : pos + size], np.array([size]), st_in
                    )
                    steps.append(sp)
                    pos += size
                fed = (np.concatenate(steps, axis=1), probs_out, st_in)
                probs, st = _diffs(fed, whole, np.ones((1, t_max), dtype=bool))
                report.streaming = max(report.streaming, probs)
                report.add("streaming_vs_whole", probs, st)
    return report
