"""`lstm-export`: train the shipped models, verify exported ones, print a description."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from export.recipes import train_recipe

    report = train_recipe(args.model, Path(args.out), version=args.version, epochs=args.epochs)
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
    from lstmserve.contract import read_description

    path = Path(args.path)
    desc = read_description(str(path / "model.onnx" if path.is_dir() else path))
    print(json.dumps(desc.to_dict(), indent=2, ensure_ascii=False))
    return 0


def _crossval(args: argparse.Namespace) -> int:
    from export.crossval import SPEAKER_CANDIDATES, cross_validate
    from export.recipes import RECIPES

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

    failed = 0
    for path in args.paths:
        report = refresh_card(Path(path))
        print(json.dumps({"model": report["model"], "verify": report["verify"]}))
        failed += not report["verify"]["passed"]
    return 1 if failed else 0


def _tiny(args: argparse.Namespace) -> int:
    from export.tiny import write_tiny_repository

    for name, path in write_tiny_repository(Path(args.out)).items():
        print(f"{name}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from export.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="lstm-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a shipped model and export it with its card")
    train.add_argument("model", choices=sorted(RECIPES))
    train.add_argument("--out", default="models", help="model repository (default: models)")
    train.add_argument("--version", type=int, default=1)
    train.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    train.set_defaults(func=_train)
    verify = sub.add_parser("verify", help="check exported models against the v1 contract")
    verify.add_argument("paths", nargs="+", help="models/NAME/VERSION or a model.onnx")
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(func=_verify)
    describe = sub.add_parser("describe", help="print a model's embedded description")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
