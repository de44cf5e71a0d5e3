"""Print the serving image's requirements, read from pyproject.toml, one per line.

cpu: the base dependencies and the `tracing` extra (OpenTelemetry: pure Python, a few MB; a
pod turns tracing on with LSTM_SERVE_TRACE_OTLP_ENDPOINT, no other image). gpu: the same with
plain `onnxruntime` replaced by the `gpu` extra (`onnxruntime-gpu`). Both wheels install into the
same `onnxruntime` package, so installing both and uninstalling one afterwards deletes files the
other needs; resolving the right list once avoids that. Never any other extra: torch lives in
`train` and stays out.
Standard library only: it runs in the image's build stage before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

TARGETS = ("cpu", "gpu")
CPU_RUNTIME = "onnxruntime"
IMAGE_EXTRAS = ("tracing",)  # every image has these


def distribution_name(requirement: str) -> str:
    """'onnxruntime>=1.20' -> 'onnxruntime' (PEP 503 normalised)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if match is None:
        raise ValueError(f"cannot read a distribution name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, target: str) -> list[str]:
    """The requirement strings to install for `target` (cpu or gpu)."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r} is not one of {TARGETS}")
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    base: list[str] = list(project["dependencies"])
    for extra in IMAGE_EXTRAS:
        base += extras[extra]
    if target == "cpu":
        return base
    gpu: list[str] = list(extras["gpu"])
    return [r for r in base if distribution_name(r) != CPU_RUNTIME] + gpu


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: requirements.py cpu|gpu PYPROJECT_TOML", file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(argv[2]), argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
