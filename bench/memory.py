"""Memory of idle sessions: open N sessions of the bench model in-process via the engine.

    python -m bench.memory --sessions 100000 [--repo DIR]

Prints one JSON line: the resident-set growth over N x S x H x 4 raw state bytes (the target is
<= 1.5x), the slab's allocated bytes and the Python bytes per session (tracemalloc, on a sample).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import psutil

from bench.model import BENCH_MODEL, build_repository


def open_sessions(repo: Path, count: int, sample: int) -> dict[str, Any]:
    import asyncio

    from service.engine.core import Engine
    from service.engine.session.sessions import SessionStore
    from service.engine.types import RuntimeOptions, StreamOptions

    store = SessionStore(max_sessions=count + sample + 1, idle_timeout_s=3600)
    cpu = RuntimeOptions(providers=("CPUExecutionProvider",))
    engine = Engine(store, 1, runtime=cpu, repository=repo)
    asyncio.run(engine.load_models())
    model = engine.registry.get(BENCH_MODEL)
    desc = model.description
    opts = StreamOptions()

    def open_many(n: int) -> list[Any]:
        async def main() -> list[Any]:
            return [await engine.open_session(BENCH_MODEL, 0, opts) for _ in range(n)]

        return asyncio.run(main())

    keep = open_many(1)  # the slab and the metrics exist
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    keep += open_many(count)
    gc.collect()
    rss1 = psutil.Process().memory_info().rss
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    keep += open_many(sample)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    python_bytes = sum(
        s.size_diff for s in after.compare_to(before, "filename")
        if "numpy" not in s.traceback[0].filename
    )  # fmt: skip
    raw = count * desc.state_rows * desc.hidden_size * 4
    slab = {"allocated": model.state.allocated_bytes, "used": model.state.used_bytes}
    engine.close()
    return {
        "sessions": count,
        "state_rows": desc.state_rows,
        "hidden_size": desc.hidden_size,
        "raw_state_bytes": raw,
        "rss_growth_bytes": rss1 - rss0,
        "ratio": (rss1 - rss0) / raw,
        "slab_allocated_bytes": slab["allocated"],
        "python_bytes_per_session": python_bytes / sample,
        "target_ratio": 1.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=2_000, help="sessions traced by tracemalloc")
    parser.add_argument("--repo", type=Path, default=None)
    args = parser.parse_args()
    if args.repo is not None:
        print(json.dumps(open_sessions(args.repo, args.sessions, args.sample)))
        return
    with tempfile.TemporaryDirectory(prefix="lstm-bench-mem-") as tmp:
        build_repository(Path(tmp))
        print(json.dumps(open_sessions(Path(tmp), args.sessions, args.sample)))


if __name__ == "__main__":
    main()
