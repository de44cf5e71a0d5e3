"""lstm-serve --native-front: the server runs the native front (native/) on its gRPC port itself.

Stream through it is answered as by the Python front, every other RPC passes through, a
SIGKILLed front is started again on the same port (the client resumes its session), SIGTERM
drains through the front before it stops (both exit 0), the front ends with a SIGKILLed
lstm-serve, and a missing binary or a busy port is a one-line configuration error.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ROOT, ServerProcess
from tests.e2e.test_image import health_after_sigterm
from tests.e2e.test_native_front import (
    _blanked,
    _text,
    converse,
    frames_conversation,
    text_conversation,
)
from tests.native_front import binary

TOKEN = "supervised-front-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
KEY = ("--snapshot-key", "k1:" + "A" * 44)


def supervised(tmp: Path, *extra: str) -> ServerProcess:
    """lstm-serve --native-front (this checkout's binary), ready; its "listening" port is the
    front's."""
    server = ServerProcess(ROOT / "models", "--native-front", "--native-front-bin",
                           str(binary()), *extra)  # fmt: skip
    server.wait_event("ready", 60)
    return server


def started(server: ServerProcess) -> dict:
    """The first "native front started" line (logged before "ready", which wait_event passed)."""
    for line in list(server.lines):
        if '"native front started"' in line:
            return json.loads(line)
    raise AssertionError(f"no 'native front started' line:\n{''.join(server.lines)}")


def front_pid(server: ServerProcess) -> int:
    """The front process of `server` (its one child running the binary)."""
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    for pid in map(int, children.split()):
        if Path(f"/proc/{pid}/exe").resolve() == binary().resolve():
            return pid
    raise AssertionError(f"no native front below lstm-serve {server.proc.pid}: {children!r}")


def running(pid: int) -> bool:
    """Alive and not a zombie (a front whose lstm-serve died is reaped by whoever adopted it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def metric(server: ServerProcess, name: str) -> float | None:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """(lstm-serve --native-front, plain lstm-serve): the same models, tokens and key."""
    binary()
    tokens = tmp_path_factory.mktemp("supervised") / "tokens"
    tokens.write_text(f"alice:{TOKEN}\n")
    native = supervised(tokens.parent, "--auth-tokens", str(tokens), *KEY)
    python = ServerProcess(ROOT / "models", "--auth-tokens", str(tokens), *KEY)
    python.wait_event("ready", 60)
    yield native, python
    assert native.stop() == 0 and python.stop() == 0


def test_stream_through_the_supervised_front_is_the_python_fronts(pair) -> None:
    native, python = pair
    first = started(native)
    assert first["port"] == native.port  # the gRPC port is the front's
    folder = Path(first["dir"])
    assert folder.stat().st_mode & 0o777 == 0o700 and (folder / "ticks.sock").exists()
    for requests in (text_conversation(), frames_conversation(3)):
        expected = asyncio.run(converse(python.address, requests, AUTH))
        got = asyncio.run(converse(native.address, requests, AUTH))
        assert got[-1] == grpc.StatusCode.OK and len(got) == len(requests) + 1
        assert got == expected
    assert running(front_pid(native))


def test_classify_health_and_auth_pass_through(pair) -> None:
    native, python = pair

    def calls(address: str) -> tuple[object, ...]:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.LstmServeStub(channel)
            sequence = pb.SequenceInput(text="bonjour tout le monde")
            request = pb.ClassifyRequest(model="langid-chars", sequences=[sequence], top_k=2)
            classify = stub.Classify(request, metadata=AUTH, timeout=10)
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="lstmserve.v1.LstmServe"), timeout=10
            )
            try:
                stub.ListModels(pb.ListModelsRequest(), timeout=10)
                refused: object = None
            except grpc.RpcError as exc:
                refused = exc.code()
        return classify, health.status, refused

    got = calls(native.address)
    assert got == calls(python.address)
    assert got[1] == health_pb2.HealthCheckResponse.SERVING
    assert got[2] == grpc.StatusCode.UNAUTHENTICATED and len(got[0].results[0].top) == 2


def test_a_killed_front_is_started_again_and_the_client_resumes(pair, tmp_path: Path) -> None:
    """SIGKILL the front mid-session: the stream ends UNAVAILABLE, lstm-serve starts the front
    again on the same port (logged, counted), and the session resumes there, its next chunk
    answered as on an uninterrupted session."""
    _, python = pair
    server = supervised(tmp_path, *KEY)
    first = started(server)
    chunks = [_text(1, "hello wor"), _text(2, "ld, how are"), _text(3, " you today")]
    opened = pb.StreamRequest(open=pb.OpenSession(model="langid-chars"))

    async def killed_mid_session() -> tuple[str, list[object]]:
        more: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()
        for request in (opened, *chunks[:2]):
            more.put_nowait(request)

        async def requests():
            while True:
                yield await more.get()

        replies: list[object] = []
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream(requests())
            try:
                async for reply in call:
                    replies.append(reply)
                    if len(replies) == 3:
                        os.kill(front_pid(server), signal.SIGKILL)
            except grpc.aio.AioRpcError as exc:
                replies.append(exc.code())
        return replies[0].opened.session_id, replies

    try:
        session_id, before = asyncio.run(killed_mid_session())
        assert before[-1] == grpc.StatusCode.UNAVAILABLE and len(before) == 4
        restarted = server.wait_event("native front ended; starting it again", 10)
        again = server.wait_event("native front started", 15)
        assert again["port"] == first["port"] == server.port and again["pid"] != first["pid"]
        assert restarted["exit_status"] == -signal.SIGKILL
        resume = pb.StreamRequest(resume=pb.ResumeSession(session_id=session_id))
        after = asyncio.run(converse(server.address, [resume, chunks[2]], ()))
        restarts = metric(server, "lstm_serve_native_front_restarts_total")
        up = metric(server, "lstm_serve_native_front_up")
    finally:
        code = server.stop()
    expected = asyncio.run(converse(python.address, [opened, *chunks], AUTH))
    assert after[0].opened.resumed and after[1] == expected[3] and after[-1] == grpc.StatusCode.OK
    assert (restarts, up, code) == (1.0, 1.0, 0)


def scrape(server: ServerProcess) -> dict[str, float]:
    """Every unlabelled series of lstm-serve's /metrics."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {ln.split()[0]: float(ln.split()[1]) for ln in lines if ln and ln[0] != "#"
            and "{" not in ln}  # fmt: skip


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CPU = "lstm_serve_native_front_cpu_seconds_total"
RSS = "lstm_serve_native_front_resident_memory_bytes"
THREADS = "lstm_serve_native_front_threads"
FDS = "lstm_serve_native_front_open_fds"
STREAMS = "lstm_serve_native_front_streams"


def test_the_fronts_process_figures_and_streams_held_are_in_metrics(tmp_path: Path) -> None:
    """/metrics shows the supervised front's CPU, resident memory, threads and descriptors as
    /proc shows its pid's (CPU grows under load), and the client streams lstm-serve holds for
    it: 1 while one is open, 0 once it ended."""
    server = supervised(tmp_path)
    try:
        pid = front_pid(server)
        idle = scrape(server)
        status = proc_status(pid)
        rss = int(status["VmRSS"].split()[0]) * 1024
        assert rss / 2 <= idle[RSS] <= rss * 2, (idle[RSS], rss)
        assert abs(idle[THREADS] - int(status["Threads"])) <= 4, (idle[THREADS], status)
        assert abs(idle[FDS] - len(os.listdir(f"/proc/{pid}/fd"))) <= 4
        assert 0 <= idle[CPU] <= proc_cpu_s(pid) + 0.05
        assert idle[STREAMS] == 0.0

        async def loaded() -> tuple[float, dict[str, float]]:
            more: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()
            more.put_nowait(pb.StreamRequest(open=pb.OpenSession(model="langid-chars")))

            async def requests():
                while (request := await more.get()) is not None:
                    yield request

            held, seq, ending, during = -1.0, 0, False, idle
            deadline = time.monotonic() + 30
            async with grpc.aio.insecure_channel(server.address) as channel:
                call = pb_grpc.LstmServeStub(channel).Stream(requests())
                async for reply in call:  # one chunk in flight; every 200th reply, a scrape
                    assert not reply.chunk.HasField("error"), reply
                    if ending:
                        continue
                    if seq % 200 == 0:
                        during = await asyncio.to_thread(scrape, server)
                        held = during[STREAMS] if seq == 0 else held
                        if during[CPU] > idle[CPU] or time.monotonic() > deadline:
                            ending = True
                            more.put_nowait(pb.StreamRequest(end=pb.End()))
                            more.put_nowait(None)
                            continue
                    seq += 1
                    more.put_nowait(_text(seq, "bonjour "))
            return held, during

        held, during = asyncio.run(loaded())
        wait_until(lambda: scrape(server)[STREAMS] == 0.0, 10, "the ended stream let go")
        after = scrape(server)
    finally:
        code = server.stop()
    assert held == 1.0 and during[CPU] > idle[CPU], (held, during[CPU], idle[CPU])
    assert after[CPU] >= during[CPU] and code == 0


def health_port(server: ServerProcess) -> int:
    for line in list(server.lines):
        if '"listening"' in line:
            return int(json.loads(line)["health_port"])
    raise AssertionError("no 'listening' line")


def grab_port_once_the_front_died(pid: int, port: int) -> socket.socket | None:
    """SIGKILL the front and take its port before lstm-serve starts it again (0.1 s later):
    its restarts then fail until the port is free (None: the new front was first)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        taker = socket.socket()
        taker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT only
        try:
            taker.bind(("127.0.0.1", port))
            taker.listen()
            return taker
        except OSError:  # the front still dying, or (too late) its successor listening
            taker.close()
            time.sleep(0.001)
    return None


def test_readiness_is_not_ready_while_the_supervised_front_is_down(tmp_path: Path) -> None:
    """The front SIGKILLed and its port taken (so its restarts fail for a while): readiness says
    not ready, with the reason (HTTP /v2/health/ready 503 and its body; gRPC health of
    lstmserve.v1.LstmServe on --health-port NOT_SERVING; lstm_serve_ready 0) while liveness
    stays (health "" SERVING, /v2/health/live 200); once the port is free and the front listens
    again, ready again."""
    server = supervised(tmp_path, "--health-port", "0")
    http = f"http://127.0.0.1:{server.http_port}/v2/health"
    channel = grpc.insecure_channel(f"127.0.0.1:{health_port(server)}")
    health = health_pb2_grpc.HealthStub(channel)

    def check(service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return health.Check(request, timeout=5).status

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(http + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        assert (get("/ready")[0], check("lstmserve.v1.LstmServe"), check("")) == (
            200, serving, serving)  # fmt: skip
        taker = None
        for _ in range(3):  # the new front may take the port first: kill that one then
            taker = grab_port_once_the_front_died(front_pid(server), server.port)
            if taker is not None:
                break
            server.wait_event("native front started", 15)
        assert taker is not None, "the port was never free between the front's restarts"
        try:
            wait_until(lambda: get("/ready")[0] == 503, 10, "not ready while the front is down")
            down = (
                get("/ready"),
                check("lstmserve.v1.LstmServe"),
                check("inference.GRPCInferenceService"),
                check(""),
                get("/live")[0],
                metric(server, "lstm_serve_ready"),
                metric(server, "lstm_serve_native_front_up"),
            )
            server.wait_event("native front did not start", 15)  # a restart failed meanwhile
            still = get("/ready")[0]
        finally:
            taker.close()
        server.wait_event("native front started", 15)
        wait_until(lambda: get("/ready")[0] == 200, 10, "ready again once the front listens")
        back = (check("lstmserve.v1.LstmServe"), check(""), metric(server, "lstm_serve_ready"))
        answered = asyncio.run(
            converse(
                server.address,
                [
                    pb.StreamRequest(open=pb.OpenSession(model="langid-chars")),
                    pb.StreamRequest(end=pb.End()),
                ],
                (),
            )
        )
    finally:
        channel.close()
        code = server.stop()
    (status, body), *rest = down
    assert status == 503 and json.loads(body) == {
        "error": "not ready: the native front (--native-front) is down: it is being started again"
    }
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert rest == [not_serving, not_serving, serving, 200, 0.0, 0.0] and still == 503
    assert back == (serving, serving, 1.0) and answered[-1] == grpc.StatusCode.OK and code == 0


def test_tls_and_client_certificates_are_the_python_fronts(tmp_path: Path) -> None:
    """--tls-cert / --tls-key / --tls-client-ca serve the front's port: a verified client's
    certificate names the caller (--principal-from-cert; another cannot resume its session),
    a plaintext call is refused."""
    from tests.integration.tls_certs import Authority

    ca = Authority()
    cert, key = ca.issue("lstm-serve", server=True).write(tmp_path, "server")
    tls = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca",
           str(ca.write(tmp_path)), "--principal-from-cert")  # fmt: skip
    server = supervised(tmp_path, *tls)
    people = {name: ca.issue(name, server=False) for name in ("alice", "bob")}

    def credentials(name: str) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(ca.pem, people[name].key, people[name].cert)

    async def calls() -> list[object]:
        async with grpc.aio.secure_channel(server.address, credentials("alice")) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream(iter(text_conversation()[:2]))
            replies = [r async for r in call]
        resume = [
            pb.StreamRequest(resume=pb.ResumeSession(session_id=replies[0].opened.session_id))
        ]
        outcomes: list[object] = [replies[1].chunk.steps]
        for name in ("bob", "alice"):
            async with grpc.aio.secure_channel(server.address, credentials(name)) as channel:
                try:
                    got = [r async for r in pb_grpc.LstmServeStub(channel).Stream(iter(resume))]
                    outcomes.append(got[0].opened.resumed)
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(exc.code())
        async with grpc.aio.insecure_channel(server.address) as channel:
            try:
                await pb_grpc.LstmServeStub(channel).ListModels(pb.ListModelsRequest(), timeout=5)
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code())
        return outcomes

    try:
        outcomes = asyncio.run(calls())
        argv = Path(f"/proc/{front_pid(server)}/cmdline").read_bytes().split(b"\0")
    finally:
        assert server.stop() == 0
    assert outcomes == [9, grpc.StatusCode.NOT_FOUND, True, grpc.StatusCode.UNAVAILABLE]
    for flag, value in zip(tls[:-1:2], tls[1::2], strict=True):
        assert argv[argv.index(flag.encode()) + 1] == value.encode()


def test_new_connections_get_a_rotated_certificate_open_ones_keep_theirs(tmp_path: Path) -> None:
    """The TLS files replaced (another CA's certificate): within seconds new connections get
    the new certificate, and a stream opened before goes on, as on the Python front."""
    from tests.integration.tls_certs import Authority

    old, new = Authority("old CA"), Authority("new CA")
    cert, key = old.issue("lstm-serve", server=True).write(tmp_path, "server")
    server = supervised(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))

    def handshakes(ca: Authority) -> bool:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.pem)
        with grpc.secure_channel(server.address, credentials) as channel:  # a new connection
            try:
                pb_grpc.LstmServeStub(channel).ListModels(pb.ListModelsRequest(), timeout=2)
            except grpc.RpcError:
                return False
        return True

    credentials = grpc.ssl_channel_credentials(root_certificates=old.pem)
    try:
        with grpc.secure_channel(server.address, credentials) as channel:
            more: queue.Queue[pb.StreamRequest] = queue.Queue()
            replies = pb_grpc.LstmServeStub(channel).Stream(iter(more.get, None), timeout=60)
            for request in text_conversation()[:2]:
                more.put(request)
            assert next(replies).HasField("opened") and next(replies).chunk.steps == 9
            assert handshakes(old) and not handshakes(new)
            new_cert, new_key = new.issue("lstm-serve", server=True).write(tmp_path, "new")
            os.replace(new_key, key)
            os.replace(new_cert, cert)
            wait_until(lambda: handshakes(new), 15, "a new connection gets the new certificate")
            assert not handshakes(old)
            more.put(_text(2, "ld"))
            assert next(replies).chunk.steps == 2  # the stream opened before goes on
            more.put(None)  # type: ignore[arg-type]
    finally:
        assert server.stop() == 0


def test_sigterm_drains_through_the_front_then_both_exit_0(tmp_path: Path) -> None:
    """SIGTERM to lstm-serve: health through the front leaves SERVING, the open stream gets its
    session's final snapshot through the front, then UNAVAILABLE; the front is stopped after
    that, and both exit 0."""
    server = supervised(tmp_path, *KEY, "--drain-grace-s", "5")
    pid = front_pid(server)

    async def held_open() -> list[object]:
        more: asyncio.Queue[pb.StreamRequest] = asyncio.Queue()
        for request in text_conversation()[:3]:
            more.put_nowait(request)

        async def requests():
            while True:
                yield await more.get()

        replies: list[object] = []
        health: list[asyncio.Task[int]] = []
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream(requests())
            try:
                async for reply in call:
                    replies.append(_blanked(reply))
                    if len(replies) == 3:
                        server.terminate()
                        health.append(asyncio.create_task(asyncio.to_thread(health_after)))
            except grpc.aio.AioRpcError as exc:
                replies.append(exc.code())
        return [*replies, await health[0]]

    def health_after() -> int:  # through the front's pass-through, on its own channel
        with grpc.insecure_channel(server.address) as channel:
            return health_after_sigterm(health_pb2_grpc.HealthStub(channel))

    try:
        *replies, health = asyncio.run(asyncio.wait_for(held_open(), 30))
        code = server.proc.wait(20)
    finally:
        server.stop()
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert replies[3].snapshot.final and replies[3].snapshot.last_applied_seq == 2
    assert replies[-1] == grpc.StatusCode.UNAVAILABLE and len(replies) == 5
    stopped = server.wait_event("native front stopped", 1)
    assert (code, stopped["exit_status"], running(pid)) == (0, 0, False)


def test_the_front_ends_when_lstm_serve_is_sigkilled(tmp_path: Path) -> None:
    server = supervised(tmp_path)
    pid = front_pid(server)
    folder = Path(started(server)["dir"])
    try:
        server.proc.kill()
        server.proc.wait(10)
        wait_until(lambda: not running(pid), 15, f"the front {pid} ends after its lstm-serve")
    finally:
        if running(pid):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(folder)], check=False)  # nobody was left to remove it


def test_a_sigkilled_lstm_serves_socket_directory_goes_at_the_next_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --native-front-dir: a SIGKILLed lstm-serve leaves its private directory behind;
    the next lstm-serve started removes it (logged), and leaves a live one's directory, whose
    server goes on answering through its front. Those that stop remove their own."""
    tmp = Path(tempfile.mkdtemp(prefix="ops-", dir="/tmp"))  # short: sockets' paths are bounded
    monkeypatch.setenv("TMPDIR", str(tmp))
    servers: list[ServerProcess] = []
    try:
        live = supervised(tmp)
        servers.append(live)
        killed = supervised(tmp)
        servers.append(killed)
        live_dir, stale = Path(started(live)["dir"]), Path(started(killed)["dir"])
        front = front_pid(killed)
        killed.proc.kill()
        killed.proc.wait(10)
        wait_until(lambda: not running(front), 15, "the killed server's front ends too")
        assert stale.is_dir() and live_dir.is_dir() and stale.parent == live_dir.parent == tmp
        after = supervised(tmp)
        servers.append(after)
        removed = [json.loads(line)["dir"] for line in list(after.lines) if
                   '"removed a native front socket directory left by a dead' in line]  # fmt: skip
        after_dir = Path(started(after)["dir"])
        assert not stale.exists() and removed == [str(stale)]
        assert sorted(tmp.glob("lstm-serve-front-*")) == sorted([live_dir, after_dir])
        opened = pb.StreamRequest(open=pb.OpenSession(model="langid-chars"))
        answered = asyncio.run(converse(live.address, [opened, pb.StreamRequest(end=pb.End())], ()))
        assert answered[-1] == grpc.StatusCode.OK
        codes = (live.stop(), after.stop())
        assert codes == (0, 0) and list(tmp.glob("lstm-serve-front-*")) == []
    finally:
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def serve_briefly(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "--host", "127.0.0.1", "--metrics-port", "-1",
         "--http-port", "-1", "--model-repository", str(ROOT / "models"), *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["/nonexistent/lstm-serve-front", "no-such-front-binary"])
def test_a_missing_binary_is_a_configuration_error_naming_the_flag(name: str) -> None:
    done = serve_briefly("--grpc-port", "0", "--native-front", "--native-front-bin", name)
    assert done.returncode == 2, done.stderr
    assert "--native-front-bin" in done.stderr and repr(name) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_front_that_cannot_listen_is_a_configuration_error() -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        done = serve_briefly("--grpc-port", str(port), "--native-front",
                             "--native-front-bin", str(binary()))  # fmt: skip
    finally:
        busy.close()
    assert done.returncode == 2, done.stderr
    assert f"did not start on 127.0.0.1:{port}" in done.stderr and "cannot listen" in done.stderr
    assert "Traceback" not in done.stderr
