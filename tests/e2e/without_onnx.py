"""`python -m tests.e2e.without_onnx [lstm-serve flags]`: the real lstm-serve in an interpreter
where `import onnx` fails, as in the serving environment (`pip install -e .`, no extras), even
though the test environment has onnx installed. It says so on stderr (JSON lines, as the
server logs): `onnx blocked` at the start, `onnx import refused` for every attempt."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from collections.abc import Sequence
from types import ModuleType


def _say(event: str, **fields: str) -> None:
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


class NoOnnx(importlib.abc.MetaPathFinder):
    """Finds `onnx` and its submodules first, and refuses them (onnxruntime is not onnx)."""

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name == "onnx" or name.startswith("onnx."):
            _say("onnx import refused", module=name)
            raise ModuleNotFoundError(f"No module named {name!r} (the serving environment)",
                                      name=name)  # fmt: skip
        return None


def main(argv: Sequence[str]) -> int:
    assert not any(m == "onnx" or m.startswith("onnx.") for m in sys.modules), "onnx loaded"
    sys.meta_path.insert(0, NoOnnx())
    _say("onnx blocked")
    from service.cli import serve_main

    return serve_main(list(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
