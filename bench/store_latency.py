"""What the shared session store costs per chunk, on 127.0.0.1 (docs/OPERATIONS.md):

    python -m bench.store_latency --saves 2000 --chunks 1000

(1) p50 / p99 of one RedisSessionBackend.save (the compare-and-set script, a ~1 KB snapshot)
against one redis-server, and against a Sentinel group (a master, a replica, three sentinels)
with and without waiting for the replica (WAIT 1, strict mode's default there); (2) the round
trip of a one-token chunk on one Stream through an lstm-serve process, without a store and with
each store in strict mode. Prints a Markdown table; writes --out JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from bench.chaos import KEY, model_repository
from bench.procs import HOST, free_port
from bench.redisfleet import RedisNode, SentinelFleet
from lstmserve.client import LstmClient
from service.engine.continuity.redis_backend import RedisSessionBackend


def _pcts(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}  # fmt: skip


async def saves(url: str, n: int, min_replicas: int) -> dict[str, float]:
    backend = RedisSessionBackend(url, 600, min_replicas=min_replicas)
    blob = bytes(1024)
    sid = uuid.uuid4().hex
    took = []
    for i in range(n):
        start = time.perf_counter()
        await backend.save(sid, i + 1, "g", blob)
        took.append(time.perf_counter() - start)
    await backend.close()
    return _pcts(took[n // 10 :])


async def chunks(repo: Path, model: str, store: str | None, n: int) -> dict[str, float]:
    import subprocess

    port = free_port()
    argv = [sys.executable, "-m", "service.cli", "--model-repository", str(repo), "--host",
            HOST, "--grpc-port", str(port), "--metrics-port", "-1", "--http-port", "-1",
            "--log-level", "WARNING", "--compute-threads", "1",
            "--intra-op-threads", "1"]  # fmt: skip
    if store:
        argv += ["--snapshot-key", KEY, "--session-store", store]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with LstmClient([f"{HOST}:{port}"], failover_s=60) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    session = await client.open_session(model)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            took = []
            for i in range(n):
                start = time.perf_counter()
                result = await session.step([1 + i % 20])
                took.append(time.perf_counter() - start)
                assert not result.HasField("error"), result.error
            await session.end()
        return _pcts(took[n // 10 :])
    finally:
        proc.terminate()
        proc.wait(20)


async def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    single = RedisNode(work, "single").start()
    fleet = SentinelFleet(work / "sentinel").start()
    one = f"redis://{HOST}:{single.port}/0"
    try:
        model, repo = model_repository("auto", work)
        return {
            "save": {
                "redis": await saves(one, args.saves, 0),
                "sentinel": await saves(fleet.url, args.saves, 0),
                "sentinel_wait_1": await saves(fleet.url, args.saves, 1),
            },
            "chunk": {
                "no store": await chunks(repo, model, None, args.chunks),
                "redis strict": await chunks(repo, model, one, args.chunks),
                "sentinel strict (WAIT 1)": await chunks(repo, model, fleet.url, args.chunks),
            },
        }
    finally:
        fleet.stop()
        single.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=2000)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/store_latency.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lstm-store-") as tmp:
        result = asyncio.run(measure(args, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| what | p50 ms | p99 ms |\n|---|---|---|")
    for group, rows in result.items():
        for name, r in rows.items():
            print(f"| {group}: {name} | {r['p50_ms']} | {r['p99_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
