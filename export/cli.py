"""`lstm-export`: train the shipped models, export your own (from-torch; config for any ONNX),
verify exported ones, print a description, write an int8 copy (quantize)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TRAIN_EXTRA = "needs the training extra (pip install -e '.[train]')"
# A command run where its extra is not installed (`lstm-export` is in every environment): the
# missing top-level module -> the extra that brings it, named in one line instead of a traceback.
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "onnx", "onnxscript", "matplotlib"), "export"),
    **dict.fromkeys(("aeon", "tqdm", "sklearn", "scipy", "pandas", "numba"), "train"),
    "tokenizers": "tokenizers",
}


def _train(args: argparse.Namespace) -> int:
    try:
        from export.recipes import RECIPES, train_recipe
    except ImportError as exc:  # the [export] environment: no data loaders, no progress bars
        print(f"lstm-export train {TRAIN_EXTRA}: {exc}", file=sys.stderr)
        return 2
    if args.model not in RECIPES:
        print(f"unknown model {args.model!r}; choose from {sorted(RECIPES)}", file=sys.stderr)
        return 2
    report = train_recipe(
        args.model, Path(args.out), version=args.version, epochs=args.epochs, cell=args.cell
    )
    print(
        json.dumps(
            {
                "model": report["model"],
                "test_accuracy": report["test_accuracy"],
                "per_class_accuracy": report["per_class_accuracy"],
                "verify": report["verify"],
            },
            indent=2,
            ensure_ascii=False,
        )
    )
    return 0 if report["verify"]["passed"] else 1


def _verify(args: argparse.Namespace) -> int:
    from export.verify import verify_model

    failed = 0
    for path in args.paths:
        report = verify_model(Path(path), seed=args.seed)
        status = "PASS" if report.passed else "FAIL"
        print(json.dumps({"status": status, **report.to_dict()}))
        failed += not report.passed
    return 1 if failed else 0


def _describe(args: argparse.Namespace) -> int:
    """The description the server serves the model with: the one embedded by lstm-export, or
    for a model with a config.pbtxt what the server reads from the config and the graph (its
    output_kind and vocabulary size among them, each with the rule that gave it)."""
    from export.model_paths import resolve_model
    from lstmserve.contract import read_description
    from service.engine.byo.tritonconfig import CONFIG_FILE

    path = resolve_model(Path(args.path))
    if (path.parent.parent / CONFIG_FILE).is_file():
        from service.engine.byo.generic import GenericRuntime
        from service.engine.compute.runtime import CPU
        from service.tritonconfig import load_triton_config

        triton = load_triton_config(path.parent.parent)
        desc = GenericRuntime(path, triton, (CPU,)).description
    else:
        desc = read_description(str(path))
    print(json.dumps(desc.to_dict(), indent=2, ensure_ascii=False))
    return 0


def _crossval(args: argparse.Namespace) -> int:
    try:
        from export.crossval import SPEAKER_CANDIDATES, cross_validate
        from export.recipes import RECIPES
    except ImportError as exc:
        print(f"lstm-export crossval {TRAIN_EXTRA}: {exc}", file=sys.stderr)
        return 2

    if args.model != "speaker-vowels":
        print(f"no candidate list for {args.model}; only speaker-vowels has one", file=sys.stderr)
        return 2
    recipe = RECIPES[args.model]
    ds, tokenizer = recipe.load()
    rows = cross_validate(
        recipe.arch(ds, tokenizer), recipe.train, ds.train + ds.val, SPEAKER_CANDIDATES,
        k=args.folds, seeds=args.seeds,
    )  # fmt: skip
    print(json.dumps(rows, indent=2))
    return 0


def _card(args: argparse.Namespace) -> int:
    from export.cards import refresh_card
    from export.quantize import refresh_card as refresh_int8_card

    failed = 0
    for path in args.paths:
        int8 = (Path(path) / "quantization_report.json").is_file()
        report = (refresh_int8_card if int8 else refresh_card)(Path(path))
        print(json.dumps({"model": report["model"], "verify": report["verify"]}))
        failed += not report["verify"]["passed"]
    return 1 if failed else 0


def _tiny(args: argparse.Namespace) -> int:
    from export.tiny import write_tiny_repository

    for name, path in write_tiny_repository(Path(args.out)).items():
        print(f"{name}: {path}")
    return 0


def _from_torch(args: argparse.Namespace) -> int:
    from export.from_torch import MappingError, VerificationError, export_from_torch

    try:
        try:
            kwargs = json.loads(args.kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--kwargs is not JSON ({exc}): {args.kwargs[:64]!r}") from exc
        if not isinstance(kwargs, dict):
            raise ValueError(f"--kwargs must be a JSON object, got {args.kwargs[:64]!r}")
        report = export_from_torch(
            args.module, Path(args.weights), Path(args.labels), Path(args.out), kwargs,
            tokenizer=args.tokenizer, input_kind=args.input,
            command="lstm-export " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
        )  # fmt: skip
    except MappingError as exc:
        print(f"lstm-export from-torch: unsupported module: {exc}", file=sys.stderr)
        return 3
    except VerificationError as exc:
        print(f"lstm-export from-torch: verification FAILED: {exc}", file=sys.stderr)
        return 4
    except (ValueError, OSError) as exc:
        print(f"lstm-export from-torch: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"status": "PASS", **report}, indent=2, ensure_ascii=False))
    return 0


def _config(args: argparse.Namespace) -> int:
    from export.starter import starter_config_text

    try:
        print(starter_config_text(Path(args.path), name=args.name), end="")
    except (ValueError, OSError) as exc:
        print(f"lstm-export config: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_own_model_commands(sub: argparse._SubParsersAction) -> None:
    """from-torch and config: a user's own model (these import no training dependency)."""
    ft = sub.add_parser("from-torch", help="map and export your own nn.Module (LSTM/GRU/RNN)")
    ft.add_argument("--module", required=True, help="FILE.py:CLASS of your nn.Module")
    ft.add_argument("--weights", required=True, help="its state dict, saved with torch.save")
    ft.add_argument("--labels", required=True, help="LABELS.txt, one class name per line")
    ft.add_argument("--out", required=True, help="REPO/NAME/VERSION to write model.onnx into")
    ft.add_argument("--kwargs", default="{}", help="JSON object of constructor arguments")
    ft.add_argument("--tokenizer", default=None, help="chars:VOCAB.txt or tokenizer.json")
    kinds = ["tokens", "features"]
    ft.add_argument("--input", choices=kinds, help="default: tokens iff it has an nn.Embedding")
    ft.set_defaults(func=_from_torch)
    config = sub.add_parser("config", help="print a starter Triton config.pbtxt for any ONNX")
    config.add_argument("path", help="MODEL.onnx")
    config.add_argument("--name", default=None, help="model name (default: from the path)")
    config.set_defaults(func=_config)


def _quantize(args: argparse.Namespace) -> int:
    from export.quantize import quantize_model

    command = "lstm-export " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    try:
        report = quantize_model(
            Path(args.model_dir), Path(args.out), per_channel=args.per_channel,
            bench_seconds=args.bench_seconds, command=command,
        )  # fmt: skip
    except (ValueError, OSError) as exc:
        print(f"lstm-export quantize: {exc}", file=sys.stderr)
        return 2
    status = "PASS" if report["verify"]["passed"] else "FAIL"
    print(json.dumps({"status": status, **report}, indent=2, ensure_ascii=False))
    return 0 if report["verify"]["passed"] else 1


def _add_quantize_command(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="write an int8 copy (onnxruntime dynamic quantization)")
    q.add_argument("model_dir", help="models/NAME/VERSION (or its model.onnx)")
    q.add_argument("--out", required=True, help="REPO/NAME/VERSION of the int8 copy")
    q.add_argument("--per-channel", action="store_true", help="a weight scale per output row")
    q.add_argument(
        "--bench-seconds", type=float, default=0.0,
        help="also measure the int8 / float32 compute ceiling, this long per model and point",
    )  # fmt: skip
    q.set_defaults(func=_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lstm-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a shipped model and export it with its card")
    train.add_argument("model", help="speaker-vowels or langid-chars")
    train.add_argument("--out", default="models", help="model repository (default: models)")
    train.add_argument("--version", type=int, default=1)
    train.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    train.add_argument(
        "--cell", choices=["rnn", "gru", "lstm", "jordan"], default=None,
        help="replace the recipe's cell, all else equal (the model is named NAME-CELL)",
    )  # fmt: skip
    train.set_defaults(func=_train)
    verify = sub.add_parser(
        "verify",
        help="check served models: streaming == whole sequence, a batch == each row alone "
        "(and PyTorch parity for our own exports); a folder with a config.pbtxt is a model of "
        "your own",
    )
    verify.add_argument("paths", nargs="+", help="models/NAME/VERSION or a model.onnx")
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(func=_verify)
    describe = sub.add_parser(
        "describe", help="print the description a model is served with (config.pbtxt models too)"
    )
    describe.add_argument("path")
    describe.set_defaults(func=_describe)
    crossval = sub.add_parser("crossval", help="k-fold CV of candidate settings (train split)")
    crossval.add_argument("model", choices=["speaker-vowels"])
    crossval.add_argument("--folds", type=int, default=5)
    crossval.add_argument("--seeds", type=int, default=2)
    crossval.set_defaults(func=_crossval)
    card = sub.add_parser("card", help="re-verify exported models and rewrite their cards")
    card.add_argument("paths", nargs="+", help="models/NAME/VERSION")
    card.set_defaults(func=_card)
    tiny = sub.add_parser("tiny", help="write tiny random models of every architecture")
    tiny.add_argument("--out", required=True)
    tiny.set_defaults(func=_tiny)
    _add_own_model_commands(sub)
    from export.inspect_trace_cli import add_inspect_trace_commands

    add_inspect_trace_commands(sub)
    _add_quantize_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"lstm-export {args.command} needs the {extra} extra "
              f"(pip install -e '.[{extra}]'): {exc}", file=sys.stderr)  # fmt: skip
        return 2


if __name__ == "__main__":
    sys.exit(main())
