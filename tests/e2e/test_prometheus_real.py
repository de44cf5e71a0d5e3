"""A real Prometheus (Debian's `prometheus`, on 127.0.0.1, a temp config and storage, 1 s
scrapes and rule evaluations) scraping a real lstm-serve process under a small load, then
asked, through its HTTP API, every expression of the Grafana dashboard (template variables
substituted), every rule of deploy/prometheus/rules.yml and prometheus-adapter's query.

The server: the shipped langid-chars (version 1) beside a version 2 that cannot load
(`--model-control poll`), a redis-server store, bearer tokens, --max-sessions 4 and
--max-sessions-per-principal 4. The load: three native streams (chunks, a snapshot), a
Classify, an open Triton sequence (4 sessions: both limits reached), two opens by another
principal refused RESOURCE_EXHAUSTED a scrape apart, a call without a token. The scrape adds
the target labels a ServiceMonitor would (namespace, pod).

Healthy, every dashboard query, recording rule and the adapter's query return data; of the
alerts, ModelLoadFailed, SessionsNearLimit, PrincipalNearQuota and ErrorRatioHigh (RESOURCE_
EXHAUSTED is every finished Stream call) return data, SessionStoreDown and VersionStuckDraining
are empty. Then redis-server is killed and a chunk sent (refused in-band, strict mode) and
version 1's folder removed (it drains, its sessions open): both return data. Restarting is
empty (one process start) and ChunkLatencyHigh depends on the machine's load: for these two,
and every rule, the series the expression names must exist in Prometheus (but
lstm_serve_native_front_up, absent without --native-front: NativeFrontRestarting and
NativeFrontDown are empty here). Every rule reports
health "ok" (evaluated without error) from Prometheus's rule manager.
"""

from __future__ import annotations

import json
import queue
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, ServerProcess
from tests.e2e.prometheus_tools import prometheus_binary
from tests.unit.test_deploy_grafana import dashboard, expressions, metric_names

MODEL = "langid-chars"
TOKEN = "prometheus-test-token-1234"  # alice's: she holds every session
OTHER_TOKEN = "prometheus-test-token-5678"  # bob's: his open finds the server full
KEY = "k1:" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWY="
NAMESPACE, POD = "lstm-serve", "lstm-serve-0"  # the target labels a ServiceMonitor adds
MAX_SESSIONS = 4
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
ADAPTER = ROOT / "deploy" / "prometheus" / "prometheus-adapter-values.yaml"
DEADLINE_S = 20.0  # for Prometheus to see what the load did
FIRING_WHEN_HEALTHY = {
    "LstmServeModelLoadFailed", "LstmServeSessionsNearLimit", "LstmServePrincipalNearQuota",
    "LstmServeErrorRatioHigh",
}  # fmt: skip
QUIET_WHEN_HEALTHY = {"LstmServeSessionStoreDown", "LstmServeVersionStuckDraining"}
FIRING_AFTER_FAULTS = QUIET_WHEN_HEALTHY
NOT_ASSERTED = {"LstmServeRestarting", "LstmServeChunkLatencyHigh"}  # inner series only
# This server runs the Python front (no --native-front): quiet, and the front's `up` gauge is
# absent (its restart counter is exported at 0).
NATIVE_FRONT_ONLY = {"LstmServeNativeFrontRestarting", "LstmServeNativeFrontDown"}
ABSENT_WITHOUT_NATIVE_FRONT = {"lstm_serve_native_front_up"}
AUTH = (("authorization", f"Bearer {TOKEN}"),)
REFUSED_OPENS = 'lstm_serve_requests_total{rpc="Stream", code="RESOURCE_EXHAUSTED"}'
OTHER_AUTH = (("authorization", f"Bearer {OTHER_TOKEN}"),)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@dataclass
class Redis:
    proc: subprocess.Popen[bytes]
    url: str


@pytest.fixture
def redis_store(tmp_path: Path) -> Iterator[Redis]:
    """A redis-server of this test's own (it kills it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def answers() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(answers, "redis-server", 10)
    yield Redis(proc, f"redis://127.0.0.1:{port}/0")
    proc.kill()
    proc.wait(10)


def repository(root: Path) -> Path:
    """langid-chars version 1 (the shipped model) and a version 2 that is no ONNX file."""
    repo = root / "models"
    (repo / MODEL / "1").mkdir(parents=True)
    shutil.copy(ROOT / "models" / MODEL / "1" / "model.onnx", repo / MODEL / "1" / "model.onnx")
    (repo / MODEL / "2").mkdir()
    (repo / MODEL / "2" / "model.onnx").write_bytes(b"not an onnx model")
    return repo


class Prometheus:
    """`prometheus` on a free loopback port, scraping one target every second."""

    def __init__(self, root: Path, target: str) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{
                "job_name": "lstm-serve",
                "static_configs": [
                    {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            }],
        }  # fmt: skip
        root.mkdir()
        (root / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = root / "prometheus.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [prometheus_binary("prometheus"), f"--config.file={root / 'prometheus.yml'}",
                 f"--storage.tsdb.path={root / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        wait_until(self.ready, "Prometheus ready")

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read()) if path.startswith("/api/") else response.status

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {self.log.read_text(errors='replace')}")
        try:
            return self.get("/-/ready") == 200
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now; an evaluation error fails the test."""
        answer = self.get("/api/v1/query", query=expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Stream:
    """One native Stream RPC held open (sync gRPC, requests from a queue)."""

    def __init__(
        self, stub: pb_grpc.LstmServeStub, auth: tuple[tuple[str, str], ...] = AUTH
    ) -> None:
        self.requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()
        self.replies = stub.Stream(iter(self.requests.get, None), metadata=auth, timeout=120)
        self.seq = 0

    def ask(self, request: pb.StreamRequest) -> pb.StreamResponse:
        self.requests.put(request)
        return next(self.replies)

    def open(self) -> pb.StreamResponse:
        return self.ask(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))

    def chunk(self, text: str) -> pb.StreamResponse:
        self.seq += 1
        chunk = pb.Chunk(seq=self.seq, input=pb.SequenceInput(text=text))
        return self.ask(pb.StreamRequest(chunk=chunk))

    def close(self) -> None:
        self.requests.put(None)
        self.replies.cancel()


def triton_request(client: tc.InferenceServerClient, text: str, start: bool) -> None:
    data = np.array([[text.encode()]], dtype=np.object_)
    tensor = tc.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    client.infer(MODEL, [tensor], sequence_id=7, sequence_start=start,
                 headers=dict(AUTH), client_timeout=20)  # fmt: skip


def load(server: ServerProcess, prometheus: Prometheus, streams: list[Stream]) -> None:
    """The small load of the module docstring; the sessions stay open."""
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.LstmServeStub(channel)
    for _ in range(3):
        stream = Stream(stub)
        streams.append(stream)
        assert stream.open().HasField("opened")
        for text in ("guten ", "morgen"):
            assert stream.chunk(text).HasField("chunk")
    assert streams[0].ask(pb.StreamRequest(snapshot=pb.TakeSnapshot())).HasField("snapshot")
    request = pb.ClassifyRequest(model=MODEL, sequences=[pb.SequenceInput(text="bonjour")])
    stub.Classify(request, metadata=AUTH, timeout=20)
    triton = tc.InferenceServerClient(server.address)
    triton_request(triton, "hola ", start=True)
    triton_request(triton, "amigo", start=False)
    # Refused twice, a scrape apart: rate() misses a counter's first increment (its series
    # is born at 1), as it would the first error of a real replica.
    for attempt in range(2):
        refused = Stream(stub, OTHER_AUTH)  # bob's quota lets him; the server's limit does not
        with pytest.raises(grpc.RpcError) as over:
            refused.open()
        assert over.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        if attempt == 0:
            wait_until(lambda: prometheus.query(REFUSED_OPENS), "the first refusal scraped")
    with pytest.raises(grpc.RpcError) as anonymous:
        stub.ListModels(pb.ListModelsRequest(), timeout=20)
    assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
    triton.close()


# Series only a server running its native front exports (lstm-serve --native-front: absent
# otherwise, not 0); tests/e2e/test_native_supervised.py reads them from such a server.
SUPERVISED_FRONT_ONLY = (
    "lstm_serve_native_front_up",
    "lstm_serve_native_front_cpu_seconds_total",
    "lstm_serve_native_front_resident_memory_bytes",
    "lstm_serve_native_front_threads",
    "lstm_serve_native_front_open_fds",
)


def dashboard_queries() -> dict[str, str]:
    """Every dashboard expression (panels and variables), its variables substituted: the
    namespace the target is in, every model (the dashboard's default, All = .*); not those of
    SUPERVISED_FRONT_ONLY (this server runs no native front)."""
    found = {}
    for where, expr in expressions(dashboard()):
        if any(series in expr for series in SUPERVISED_FRONT_ONLY):
            continue
        expr = expr.replace("$__rate_interval", "1m").replace("$namespace", NAMESPACE)
        found[f"dashboard {where}: {expr}"] = expr.replace("$model", ".*")
    return found


def rule_queries() -> tuple[dict[str, str], dict[str, str]]:
    """(recording rules, alerts): name -> expression."""
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    rules = [r for g in groups for r in g["rules"]]
    records = {r["record"]: r["expr"] for r in rules if "record" in r}
    return records, {r["alert"]: r["expr"] for r in rules if "alert" in r}


def adapter_query() -> str:
    """prometheus-adapter's metricsQuery as it sends it for the pods of a namespace."""
    (rule,) = yaml.safe_load(ADAPTER.read_text(encoding="utf-8"))["rules"]["custom"]
    (series,) = metric_names(rule["seriesQuery"])
    return (
        rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.GroupBy>>", "pod")
        .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{POD}"')
    )  # fmt: skip


def all_return_data(prometheus: Prometheus, queries: dict[str, str]) -> None:
    """Each query answers a non-empty vector (waiting for scrapes and rule evaluations)."""
    empty = dict(queries)

    def none_empty() -> bool:
        for name, expr in list(empty.items()):
            if prometheus.query(expr):
                del empty[name]
        return not empty

    try:
        wait_until(none_empty, "data")
    except AssertionError:
        pytest.fail("no data for:\n" + "\n".join(empty))


def test_prometheus_evaluates_the_dashboard_and_every_rule_on_a_real_server(
    tmp_path: Path, redis_store: Redis
) -> None:
    repo = repository(tmp_path)
    (tmp_path / "tokens").write_text(f"alice:{TOKEN}\nbob:{OTHER_TOKEN}\n", encoding="utf-8")
    server = ServerProcess(
        repo, "--model-control", "poll", "--repository-poll-s", "1",
        "--session-store", redis_store.url, "--session-store-mode", "strict",
        "--snapshot-key", KEY, "--auth-tokens", str(tmp_path / "tokens"),
        "--max-sessions", str(MAX_SESSIONS), "--max-sessions-per-principal", str(MAX_SESSIONS),
        "--drain-grace-s", "1",
    )  # fmt: skip
    streams: list[Stream] = []
    prometheus = None
    try:
        server.wait_event("ready")
        prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{server.metrics_port}")
        load(server, prometheus, streams)
        records, alerts = rule_queries()
        assert set(alerts) == (
            FIRING_WHEN_HEALTHY | QUIET_WHEN_HEALTHY | NOT_ASSERTED | NATIVE_FRONT_ONLY
        )
        all_return_data(prometheus, {
            **dashboard_queries(), **records, "prometheus-adapter": adapter_query(),
            **{name: alerts[name] for name in FIRING_WHEN_HEALTHY},
        })  # fmt: skip
        for name in QUIET_WHEN_HEALTHY | NATIVE_FRONT_ONLY:
            assert prometheus.query(alerts[name]) == [], f"{name} fires on a healthy server"
        for name, expr in alerts.items():
            for series in metric_names(expr) - ABSENT_WITHOUT_NATIVE_FRONT:
                assert prometheus.query(series), f"{name}: no series {series}"
        rule_health(prometheus)

        redis_store.proc.kill()  # the store goes away: the next chunk finds it down
        reply = streams[0].chunk("tag")
        assert reply.chunk.error.code == "UNAVAILABLE", reply  # strict: refused in-band
        shutil.rmtree(repo / MODEL / "1")  # version 1 leaves the repository: it drains
        all_return_data(prometheus, {name: alerts[name] for name in FIRING_AFTER_FAULTS})
    finally:
        for stream in streams:
            stream.close()
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def rule_health(prometheus: Prometheus) -> None:
    """Prometheus's rule manager loaded every rule of the file and evaluated it without error."""
    records, alerts = rule_queries()

    def all_evaluated() -> bool:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == len(records) + len(alerts) and all(
            r.get("lastEvaluation", "").startswith("20") for r in rules
        )

    wait_until(all_evaluated, "every rule evaluated")
    for group in prometheus.get("/api/v1/rules")["data"]["groups"]:
        for rule in group["rules"]:
            assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
