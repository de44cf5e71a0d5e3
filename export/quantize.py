"""`lstm-export quantize`: an int8 copy of an exported model, by onnxruntime's dynamic quantization.

`onnxruntime.quantization.quantize_dynamic` (IntegerOps mode) rewrites, of what our graphs hold:
- `LSTM` -> `DynamicQuantizeLSTM` (com.microsoft): W and R int8, X and h quantized per call;
- `MatMul` (the head) -> `DynamicQuantizeLinear` + `MatMulInteger`;
- `Gather` (a token model's embedding) -> a uint8 table dequantized after the lookup.
It has no quantizer for `GRU` or `RNN` (onnxruntime ships no integer kernel for them): their
weights stay float32 and only the head (and a token model's embedding) is quantized.

Dynamic quantization picks each activation's scale from the tensor it quantizes (the whole
chunk of a call, every row of a batch), so an int8 model no longer gives bit-equal results for a
sequence streamed in chunks vs whole, or a row batched vs alone. `verify` checks those, and
PyTorch parity against the dequantized weights, on the probabilities: the worst case at
`INT8_TOLERANCE`, the mean over cases at `INT8_MEAN_TOLERANCE` (the states are reported, not
gated); the description carries both (`training.quantization`), so `lstm-export verify` reads them.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from export.ceiling import ceiling_ratio, ceiling_table
from export.int8 import quantization_of
from export.verify import INT8_MEAN_TOLERANCE, INT8_TOLERANCE, open_session, verify_model
from lstmserve.contract import DESCRIPTION_KEY, ModelDescription

OP_TYPES = ("LSTM", "MatMul", "Gather")  # what quantize_dynamic quantizes of our graphs
NOT_QUANTIZED = {"GRU": "no integer kernel in onnxruntime", "RNN": "no integer kernel"}
MODEL_FILE = "model.onnx"
CPU_ONLY = {"DynamicQuantizeLSTM": "a CPU kernel only (onnxruntime contrib op)"}


def quantize_file(src: Path, dst: Path, per_channel: bool = False) -> dict[str, Any]:
    """quantize_dynamic(src) -> dst; returns which op types were rewritten and which stayed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(src)).graph
    before = [n.op_type for n in graph.node]
    quantize_dynamic(
        str(src), str(dst), op_types_to_quantize=list(OP_TYPES), per_channel=per_channel,
        weight_type=QuantType.QInt8,
    )  # fmt: skip
    quantized = onnx.load(str(dst)).graph
    after = [n.op_type for n in quantized.node]
    int8 = {t.name[: -len("_quantized")] for t in quantized.initializer
            if t.name.endswith("_quantized")}  # fmt: skip
    rewritten = sorted({n.op_type for n in graph.node if int8.intersection(n.input)})
    stayed = sorted({op for op in before if op in NOT_QUANTIZED})
    return {
        "method": "onnxruntime.quantization.quantize_dynamic (IntegerOps, weights int8)",
        "per_channel": per_channel,
        "quantized_ops": rewritten,
        "int8_ops": sorted({op for op in after if op not in before}),
        "float32_ops": {op: NOT_QUANTIZED[op] for op in stayed},
    }


def _describe_quantized(
    desc: ModelDescription, name: str, version: int, entry: dict[str, Any]
) -> ModelDescription:
    training = dict(desc.training) | {"quantization": entry}
    cpu_only = [f"{op}: {why}" for op, why in CPU_ONLY.items() if op in entry["int8_ops"]]
    unchecked = [op for op in entry["int8_ops"] if op not in CPU_ONLY]
    cuda = dict(desc.cuda)
    if entry["int8_ops"]:  # None: not checked on a CUDA provider here
        cuda = {"wholly_on_cuda": False if cpu_only else None, "cpu_fallback": cpu_only,
                "not_checked_on_cuda": unchecked}  # fmt: skip
    data = desc.to_dict() | {"name": name, "version": version, "training": training, "cuda": cuda}
    return ModelDescription.from_dict(data)


def _set_description(proto: onnx.ModelProto, desc: ModelDescription) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != DESCRIPTION_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (DESCRIPTION_KEY, desc.to_json())]:
        proto.metadata_props.add(key=key, value=value)
    proto.model_version = desc.version
    proto.graph.name = desc.name


# -- accuracy on the real test set -------------------------------------------------------------


def test_set_of(desc: ModelDescription) -> tuple[str, list[Any]] | None:
    """(recipe, test examples) of a shipped model's recipe, None for any other model (a tiny
    one, a user's own) or when the recipe's data cannot be read here."""
    recipe_name = desc.name.removesuffix("-int8")
    try:
        from export.recipes import RECIPES
    except ImportError:  # the [export] environment has no data loaders
        return None
    recipe = RECIPES.get(recipe_name)
    if recipe is None or "lstm-export train" not in str(desc.training.get("command", "")):
        return None
    try:
        ds, tokenizer = recipe.load()
    except (OSError, ImportError):
        return None
    if tokenizer and desc.tokenizer and list(desc.tokenizer.vocab) != tokenizer["vocab"]:
        return None  # the data no longer encodes as the model was trained
    return recipe_name, ds.test


def onnx_accuracy(path: Path, examples: list[Any], batch_size: int = 256) -> float:
    """Top-1 accuracy of the last step's answer, zero state, through onnxruntime (rows batched
    by similar length, padded; every call is independent)."""
    sess = open_session(path)
    desc = ModelDescription.from_metadata(sess.get_modelmeta().custom_metadata_map)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].x))
    correct = 0
    for start in range(0, len(order), batch_size):
        rows = [examples[i] for i in order[start : start + batch_size]]
        t_max = max(len(e.x) for e in rows)
        first = np.asarray(rows[0].x)
        x = np.zeros((len(rows), t_max, *first.shape[1:]), dtype=first.dtype)
        for b, e in enumerate(rows):
            x[b, : len(e.x)] = e.x
        lengths = np.array([len(e.x) for e in rows], dtype=np.int64)
        state = np.zeros((len(rows), desc.state_rows, desc.hidden_size), dtype=np.float32)
        probs = sess.run(["probs"], {desc.input_name: x, "lengths": lengths, "state": state})[0]
        correct += int((probs.argmax(axis=1) == np.array([e.label for e in rows])).sum())
    return correct / len(examples)


# -- the command ---------------------------------------------------------------------------------


def _target(out: Path) -> tuple[str, int]:
    try:
        return out.parent.name, int(out.name)
    except ValueError:
        raise ValueError(f"--out must be REPO/NAME/VERSION (VERSION an integer): {out}") from None


def quantize_model(
    source: Path, out: Path, *, per_channel: bool = False, bench_seconds: float = 0.0,
    command: str = "", log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> dict[str, Any]:  # fmt: skip
    """Write an int8 copy of `source` (a model folder or its model.onnx) into out/model.onnx
    with its card; returns the quantization report (also written as quantization_report.json)."""
    src = source / MODEL_FILE if source.is_dir() else source
    if not src.is_file():
        raise ValueError(f"no {MODEL_FILE} at {source}")
    name, version = _target(out)
    src_desc = ModelDescription.from_metadata(open_session(src).get_modelmeta().custom_metadata_map)
    if quantization_of(src_desc):
        raise ValueError(f"{src} is already quantized")
    out.mkdir(parents=True, exist_ok=True)
    dst = out / MODEL_FILE
    with tempfile.TemporaryDirectory() as tmp:
        entry = quantize_file(src, Path(tmp) / MODEL_FILE, per_channel=per_channel)
        entry |= {"source": f"{src_desc.name}/{src_desc.version}", "tolerance": INT8_TOLERANCE,
                  "mean_tolerance": INT8_MEAN_TOLERANCE}  # fmt: skip
        entry["command"] = command
        proto = onnx.load(str(Path(tmp) / MODEL_FILE))
    desc = _describe_quantized(src_desc, name, version, entry)
    _set_description(proto, desc)
    onnx.save_model(proto, str(dst))
    report: dict[str, Any] = {"model": f"{name}/{version}", "quantization": entry}
    report["bytes"] = {"float32": src.stat().st_size, "int8": dst.stat().st_size}
    log(f"quantized {src} -> {dst}: {entry['quantized_ops']} to int8")
    report["verify"] = verify_model(dst).to_dict()
    report["accuracy"] = _accuracy(src, dst, desc, log)
    if bench_seconds > 0:
        log(f"measuring the compute ceiling, {bench_seconds:g} s per model")
        report["ceiling"] = ceiling_ratio(src, dst, seconds=bench_seconds)
    acc = report["accuracy"]
    if "test_accuracy" in acc:  # the int8 model's own figure
        desc.training["test_accuracy"] = acc["test_accuracy"]
        desc.training["float32_test_accuracy"] = acc["float32_test_accuracy"]
    elif "test_accuracy" in desc.training:  # not measured here: the source's figure, so named
        desc.training["float32_test_accuracy"] = desc.training.pop("test_accuracy")
    _set_description(proto, desc)
    onnx.save_model(proto, str(dst))
    (out / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
    _write_training_report(src.parent, out, report)
    copy_tokenizer(source, out)
    write_card(out, desc, report, src_desc)
    return report


def refresh_card(out: Path) -> dict[str, Any]:
    """Re-verify an int8 copy and rewrite its card from quantization_report.json (the accuracy
    and ceiling figures as measured; `lstm-export quantize` again re-measures them)."""
    report = json.loads((out / "quantization_report.json").read_text())
    report["verify"] = verify_model(out).to_dict()
    (out / "quantization_report.json").write_text(json.dumps(report, indent=2) + "\n")
    desc = ModelDescription.from_metadata(
        {p.key: p.value for p in onnx.load(str(out / MODEL_FILE)).metadata_props}
    )
    source_dir = out.parent.parent / report["quantization"]["source"]
    source = desc
    if (source_dir / MODEL_FILE).is_file():
        meta = onnx.load(str(source_dir / MODEL_FILE)).metadata_props
        source = ModelDescription.from_metadata({p.key: p.value for p in meta})
    write_card(out, desc, report, source)
    return report


def _accuracy(
    src: Path, dst: Path, desc: ModelDescription, log: Callable[[str], None]
) -> dict[str, Any]:
    test = test_set_of(desc)
    if test is None:
        return {"delta": "n/a", "why": "no test set (not a shipped recipe's model, or no data)"}
    recipe, examples = test
    log(f"accuracy on the {recipe} test split ({len(examples)} sequences), float32 and int8")
    fp32, int8 = onnx_accuracy(src, examples), onnx_accuracy(dst, examples)
    return {
        "test_set": f"{recipe} test split", "test_examples": len(examples),
        "float32_test_accuracy": round(fp32, 4), "test_accuracy": round(int8, 4),
        "delta_points": round((int8 - fp32) * 100, 2),
    }  # fmt: skip


def _write_training_report(source_dir: Path, out: Path, report: dict[str, Any]) -> None:
    """The source's training report beside the int8 copy, its test figures the int8 model's."""
    path = source_dir / "training_report.json"
    if not path.is_file():
        return
    training = json.loads(path.read_text())
    acc = report["accuracy"]
    if "test_accuracy" in training:
        training["float32_test_accuracy"] = training.pop("test_accuracy")
    if "test_accuracy" in acc:
        training["test_accuracy"] = acc["test_accuracy"]
    for key in ("per_class_accuracy", "accuracy_by_steps_seen"):  # the float32 model's
        if key in training:
            training["float32_" + key] = training.pop(key)
    training["quantization"] = report["quantization"]
    (out / "training_report.json").write_text(json.dumps(training, indent=2) + "\n")


def copy_tokenizer(source: Path, out: Path) -> None:
    """A tokenizer.json beside the source goes beside the copy too."""
    tok = (source if source.is_dir() else source.parent) / "tokenizer.json"
    if tok.is_file():
        shutil.copy2(tok, out / "tokenizer.json")


# -- the card ------------------------------------------------------------------------------------


def _sci(x: float | None) -> str:
    return "n/a (not streamable)" if x is None else f"{x:.2e}"


def _pct(x: float) -> str:
    return f"{x * 100:.2f} %"


def write_card(
    out: Path, desc: ModelDescription, report: dict[str, Any], source: ModelDescription
) -> None:
    """README.md beside the int8 model: what was quantized, accuracy, tolerance, speed, size."""
    q, acc, ver = report["quantization"], report["accuracy"], report["verify"]
    size = report["bytes"]
    lines = [
        f"# {desc.name}/{desc.version}: int8 copy of {q['source']} (dynamic quantization)", "",
        f"Written by `{q['command'] or 'lstm-export quantize'}` from "
        f"`{q['source']}` ([its card](../../{q['source']}/README.md)); the description the "
        f"service reads is embedded in `model.onnx` (metadata key `{DESCRIPTION_KEY}`), with "
        "this entry under `training.quantization`.", "",
        "## Quantization",
        f"- {q['method']}, per-channel: {q['per_channel']}.",
        f"- Rewritten to int8: {', '.join(q['quantized_ops']) or 'nothing'} "
        f"(now {', '.join(q['int8_ops']) or '-'}).",
    ]  # fmt: skip
    for op, why in q["float32_ops"].items():
        lines.append(
            f"- **{op} stays float32**: quantize_dynamic has no quantizer for it ({why}); only "
            "the head (and a token model's embedding) is int8: expect no speed-up from this copy."
        )
    lines += [
        f"- Size: {size['int8']:,} bytes (float32: {size['float32']:,}, "
        f"{size['int8'] / size['float32']:.2f}x).",
        f"- Architecture unchanged: {source.architecture.get('cell')} hidden "
        f"{source.hidden_size}, state S={desc.state_rows} x H={desc.hidden_size} float32, labels "
        f"{', '.join(desc.labels)}; streamable: {desc.streamable}.",
        f"- CUDA: wholly on the CUDA provider: {desc.cuda.get('wholly_on_cuda')} (CPU only: "
        f"{', '.join(desc.cuda.get('cpu_fallback', [])) or '-'}; not checked on CUDA here: "
        f"{', '.join(desc.cuda.get('not_checked_on_cuda', [])) or '-'}).",
        "", "## Accuracy (float32 vs int8, both through onnxruntime)",
    ]  # fmt: skip
    if "test_accuracy" in acc:
        lines += [
            f"**Top-1 test accuracy: {_pct(acc['test_accuracy'])}** (int8) vs "
            f"{_pct(acc['float32_test_accuracy'])} (float32): "
            f"**{acc['delta_points']:+.2f} points**, on the {acc['test_set']} "
            f"({acc['test_examples']} sequences), label = the last step's answer.",
        ]
    else:
        lines.append(f"Accuracy delta: n/a ({acc['why']}).")
    lines += [
        "", "## Verify (`lstm-export verify` reads the tolerances from the description)",
        "Dynamic quantization scales each activation by the tensor it quantizes (the whole "
        "chunk, every row of the batch), so streaming vs whole and batched vs alone are no "
        f"longer bit-equal. verify gates the probabilities: max |diff| <= {q['tolerance']:g} and "
        f"the mean over cases <= {q['mean_tolerance']:g} (float32 models: 1e-5 on all); the "
        "states' differences are reported, not gated. Measured (seed 0):", "",
        "| check | max diff, probs | mean diff, probs | max diff, states |", "|---|---:|---:|---:|",
    ]  # fmt: skip
    for check, worst in (
        ("torch_vs_onnxruntime", ver["max_diff_torch_vs_onnxruntime"]),
        ("padded_batch_vs_alone", ver["max_diff_padded_batch_vs_alone"]),
        ("streaming_vs_whole", ver["max_diff_streaming_vs_whole"]),
    ):
        if check in ver["mean_diff"]:
            lines.append(
                f"| {check} | {_sci(worst)} | {ver['mean_diff'][check]:.2e} "
                f"| {ver['max_state_diff'][check]:.2e} |"
            )
    lines += [
        "",
        f"PyTorch = the model rebuilt from the dequantized weights; passed: {ver['passed']}.",
    ]
    if "ceiling" in report:
        lines += [
            "", "## Compute ceiling (single thread, the model alone)",
            "onnxruntime steps/s, states fed back, best of 3 windows, float32 and int8 measured "
            "alternately on the same machine (2 shared cores: +-20 %); measured by this card's "
            "command (`--bench-seconds`), re-measured by `python -m bench.ceiling int8`.", "",
        ]  # fmt: skip
        lines += ceiling_table(report["ceiling"])
    (out / "README.md").write_text("\n".join(lines) + "\n")
