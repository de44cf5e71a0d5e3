"""Real lstm-serve servers in-process (own event loop thread, 127.0.0.1, port 0) + references."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import pytest

from service.config import ServerConfig
from service.server import LstmServer, create_server
from tests.native_front import NativeFront, binary
from tests.slow_runs import slow_loads

T = TypeVar("T")


class ServerThread:
    """An lstm-serve server on its own event loop in a background thread. With `run_delay_s`,
    every model run of this server takes that much longer (tests/slow_runs.py) and no batch
    runs inline."""

    def __init__(self, config: ServerConfig, run_delay_s: float = 0.0) -> None:
        self.run_delay_s = run_delay_s
        self.config = replace(config, inline_max_steps=0) if run_delay_s else config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: LstmServer | None = None
        self.port = 0

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def start(self) -> ServerThread:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.app, self.port = create_server(self.config)
        if self.run_delay_s:
            slow_loads(self.app.engine.control.factory, self.run_delay_s)
        await self.app.start()
        await self.app.wait_until_loaded(30)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        assert self.app is not None
        return f"http://127.0.0.1:{self.app.metrics_port}/metrics"

    def stop(self) -> None:
        if self.app is not None:
            self.call(self.app.shutdown(grace_s=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def make_config(repo: Path, **overrides: Any) -> ServerConfig:
    base = ServerConfig(
        model_repository=repo, host="127.0.0.1", grpc_port=0, metrics_port=0, http_port=0,
        compute_threads=2,
    )  # fmt: skip
    return replace(base, **overrides)


@pytest.fixture(scope="session")
def server(tiny_repo: Path) -> Iterator[ServerThread]:
    """A server with the default limits on the tiny repository."""
    srv = ServerThread(make_config(tiny_repo)).start()
    yield srv
    srv.stop()


class FrontedServer:
    """A ServerThread behind the native front: clients talk to the front's port."""

    def __init__(self, server: ServerThread, front: NativeFront) -> None:
        self.server = server
        self.front = front
        self.app = server.app

    @property
    def address(self) -> str:
        return self.front.address


@pytest.fixture(scope="session")
def native_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The `server` fixture's configuration behind the native front (skips where not built)."""
    binary()
    folder = tmp_path_factory.mktemp("native") / "sockets"
    srv = ServerThread(make_config(tiny_repo, native_front_dir=str(folder))).start()
    front = NativeFront(folder)
    yield FrontedServer(srv, front)
    front.stop()
    srv.stop()


@pytest.fixture(params=["python", "native"])
def stream_server(request: pytest.FixtureRequest) -> Any:
    """The same server through each front: the Python one and the native one."""
    name = "server" if request.param == "python" else "native_server"
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def small_server(tiny_repo: Path) -> Iterator[ServerThread]:
    """A server with tight limits: 3 sessions, 1 s idle timeout, chunks of at most 16 steps."""
    config = make_config(
        tiny_repo, max_sessions=3, session_idle_timeout_s=1.0, max_chunk_steps=16,
        max_classify_sequences=4, max_sequence_steps=32,
    )  # fmt: skip
    srv = ServerThread(config).start()
    yield srv
    srv.stop()


def scrape(url: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, keyed by `name{labels}`."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll `condition` until it holds, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.01)


class Reference:
    """Offline onnxruntime results on whole sequences, straight from the model files."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self._sessions: dict[tuple[str, int], ort.InferenceSession] = {}

    def session(self, model: str, version: int = 1) -> ort.InferenceSession:
        key = (model, version)
        if key not in self._sessions:
            path = self.repo / model / str(version) / "model.onnx"
            self._sessions[key] = ort.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        return self._sessions[key]

    def run(self, model: str, steps: np.ndarray, version: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(probs (C,), step_probs (T, C)) of one whole sequence from a zero state."""
        sess = self.session(model, version)
        inputs = {i.name: i for i in sess.get_inputs()}
        state_shape = [1, *inputs["state"].shape[1:]]
        name = "tokens" if "tokens" in inputs else "features"
        step_probs, probs, _ = sess.run(
            None,
            {
                name: steps[None],
                "lengths": np.array([steps.shape[0]], dtype=np.int64),
                "state": np.zeros(state_shape, dtype=np.float32),
            },
        )
        return probs[0], step_probs[0]


@pytest.fixture(scope="session")
def reference(tiny_repo: Path) -> Reference:
    return Reference(tiny_repo)
