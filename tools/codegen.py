"""Generate the Python gRPC stubs from proto/ into lstmserve/ (the one codegen step).

python tools/codegen.py            # writes lstmserve/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi
python tools/codegen.py --out DIR  # writes them under DIR instead (the staleness test)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ("lstmserve/v1/lstm_serve.proto", "lstmserve/v1/native_front.proto")
# Protos with a gRPC service: they also get *_pb2_grpc.py (native_front.proto's messages travel
# as length-prefixed frames on a Unix socket, not gRPC).
SERVICES = ("lstmserve/v1/lstm_serve.proto",)
PACKAGES = ("lstmserve/v1",)  # lstmserve/__init__.py is hand-written (the light package)


def generate(out: Path) -> None:
    """Run protoc for every proto file, writing stubs (and package __init__ files) under `out`."""
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    for proto in PROTOS:
        rc = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                *([f"--grpc_python_out={out}"] if proto in SERVICES else []),
                str(PROTO_ROOT / proto),
            ]
        )
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {rc})")
    for package in PACKAGES:
        init = out / package / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated gRPC stubs (tools/codegen.py)."""\n')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: the repo)")
    args = parser.parse_args(argv)
    generate(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
