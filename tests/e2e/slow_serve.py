"""`python -m tests.e2e.slow_serve DELAY_MS [lstm-serve flags]`: the real lstm-serve, every model
run (warm-up included) taking DELAY_MS longer and no batch run inline. For tests only: a chunk
stays in flight long enough to stop the process under it."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from service.cli import serve_main
from service.engine.byo.generic import GenericRuntime
from service.engine.compute.runtime import ModelRuntime
from tests.slow_runs import slowed


def main(argv: Sequence[str]) -> int:
    delay_s = int(argv[0]) / 1000
    for runtime in (ModelRuntime, GenericRuntime):  # each defines its own run()
        runtime.run = slowed(runtime.run, delay_s)  # type: ignore[method-assign]
    return serve_main(["--inline-max-steps", "0", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
