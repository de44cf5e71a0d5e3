"""`python -m tests.e2e.stuck_serve [lstm-serve flags]`: the real lstm-serve whose stop never
ends: closing the engine blocks the event loop. For tests only: the drain deadline must end the
process anyway (service/drain_deadline.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

from service.cli import serve_main
from service.engine.core import Engine

STUCK_S = 600.0


def _stuck_close(self: Engine) -> None:
    time.sleep(STUCK_S)  # on the event loop's thread: nothing else runs there any more


def main(argv: Sequence[str]) -> int:
    Engine.close = _stuck_close  # type: ignore[method-assign]
    return serve_main(list(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
