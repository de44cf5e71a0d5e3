"""The `lstm-export inspect` and `lstm-export trace` subcommands (export/inspect_cmd.py,
export/trace_cmd.py); they import neither torch nor the training extra."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _inspect(args: argparse.Namespace) -> int:
    from export.inspect_cmd import format_report, inspect_model

    try:
        report = inspect_model(Path(args.model_dir))
    except (ValueError, OSError) as exc:
        print(f"lstm-export inspect: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _trace(args: argparse.Namespace) -> int:
    import matplotlib  # noqa: F401  (trace.png: a missing extra is named before any work)

    from export.trace_cmd import TraceMismatch, trace_model, write_trace

    try:
        frames = Path(args.frames) if args.frames else None
        trace = trace_model(Path(args.model_dir), args.text, frames, args.tokens)
    except TraceMismatch as exc:
        print(f"lstm-export trace: FAILED: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"lstm-export trace: {exc}", file=sys.stderr)
        return 2
    files = write_trace(trace, Path(args.out))
    summary = trace.to_dict()
    last = summary["steps"][-1]
    print(json.dumps({
        "status": "PASS", "model": trace.model, "steps": len(trace.steps),
        "predicted": last["predicted"], "probability": last["probability"],
        "max_diff_vs_onnxruntime": trace.checks, "files": files,
    }, indent=2, ensure_ascii=False))  # fmt: skip
    return 0


def add_inspect_trace_commands(sub: argparse._SubParsersAction) -> None:
    inspect = sub.add_parser(
        "inspect", help="every layer's gate weights and biases: shapes, counts, norms, the "
        "forget-gate bias (our exports and any ONNX with LSTM/GRU/RNN nodes)",
    )  # fmt: skip
    inspect.add_argument("model_dir", help="models/NAME[/VERSION] or a model.onnx")
    inspect.add_argument("--json", action="store_true", help="the whole report as JSON")
    inspect.set_defaults(func=_inspect)
    trace = sub.add_parser(
        "trace", help="recompute one sequence in numpy (checked against onnxruntime) and write "
        "every gate's activations per step as JSON and a PNG of heatmaps",
    )  # fmt: skip
    trace.add_argument("model_dir", help="models/NAME[/VERSION] or a model.onnx")
    source = trace.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text (models with a tokenizer)")
    source.add_argument("--frames", help="FILE of frames, one per line (CSV or whitespace)")
    source.add_argument("--tokens", help="token ids, comma- or space-separated")
    trace.add_argument("--out", default="trace", help="folder for trace.json and trace.png")
    trace.set_defaults(func=_trace)
