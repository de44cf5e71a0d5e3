"""The compute ceiling: raw onnxruntime steps/s of a model at a batch size and chunk length."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from export.ceiling import ceiling_ratio, ceiling_table, compute_ceiling, model_file

ROOT = Path(__file__).resolve().parents[1]
# (float32, int8) model folders `python -m bench.ceiling int8` compares by default.
SHIPPED_INT8 = [
    ("models/langid-chars/1", "models/langid-chars-int8/1"),
    ("models/speaker-vowels/1", "models/speaker-vowels-int8/1"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ceiling", description="raw onnxruntime steps/s of a model alone"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("model", help="the ceiling of one model folder")
    one.add_argument("path", type=Path)
    one.add_argument("--batch", type=int, default=1)
    one.add_argument("--steps", type=int, default=1)
    one.add_argument("--threads", type=int, default=1)
    one.add_argument("--seconds", type=float, default=3.0)
    ratio = sub.add_parser("int8", help="int8 / float32 ceiling of model pairs (default: shipped)")
    ratio.add_argument("pairs", nargs="*", help="FP32_DIR:INT8_DIR (default: both shipped)")
    ratio.add_argument("--seconds", type=float, default=3.0, help="per model and point")
    ratio.add_argument("--json", action="store_true", help="print JSON, not a markdown table")
    args = parser.parse_args(argv)
    if args.command == "model":
        figures = compute_ceiling(
            model_file(args.path), args.batch, args.steps, args.threads, args.seconds
        )
        print(json.dumps({"model": str(args.path), **figures}))
        return 0
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] or SHIPPED_INT8
    results = {}
    for fp32, int8 in pairs:
        fp32_path, int8_path = (
            Path(p) if Path(p).is_absolute() else ROOT / p for p in (fp32, int8)
        )
        results[int8] = ceiling_ratio(fp32_path, int8_path, seconds=args.seconds)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for int8, rows in results.items():
        print(f"### {int8}\n")
        print("\n".join(ceiling_table(rows)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
