"""The serving image itself: built from the Dockerfile by .ci/image.sh (buildah, no daemon) and
named by LSTM_SERVE_IMAGE, run as its non-root user with `buildah run --isolation chroot` on the
host's network: v2 HTTP ready, lstm-client (the image's own) over gRPC, the tritonclient
sequence of docs/COMING_FROM_TRITON.md, /metrics, the HEALTHCHECK script, the native front
(LSTM_SERVE_NATIVE_FRONT=true) serving a Stream session as the Python front does, and a clean
SIGTERM drain of an open stream; the CPU image stays under 500 MB."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.command_server import PORT_FLAGS, CommandServer
from tests.e2e.test_docs_triton import blocks, same_text_close_numbers

IMAGE = os.environ.get("LSTM_SERVE_IMAGE", "")
pytestmark = pytest.mark.skipif(
    not IMAGE,
    reason="LSTM_SERVE_IMAGE names an image .ci/image.sh built (`make test-image`; .ci/run does)",
)
USER = "10001:10001"  # the Dockerfile's USER; deploy/k8s runs the pods as the same
MAX_CPU_IMAGE_MB = 500
SERVER_ARGV1 = "/opt/venv/bin/lstm-serve"


def buildah(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr[-2000:]}"
    return done.stdout


def descendants(root: int) -> list[int]:
    """Every process below `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ImageServer(CommandServer):
    """`lstm-serve` in a container of the image. SIGTERM goes to the server process itself, as
    a container runtime delivers it: `buildah run` does not forward it."""

    def __init__(self, container: str, *env: str) -> None:
        settings = [flag for setting in env for flag in ("--env", setting)]  # NAME=VALUE
        super().__init__([
            "buildah", "run", "--isolation", "chroot", "--network", "host", "--user", USER,
            *settings, container, "--", "lstm-serve", *PORT_FLAGS,
        ])  # fmt: skip

    def server_pid(self) -> int:
        for pid in descendants(self.proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # python running the console script (not buildah-chroot-exec, which starts it)
            if len(argv) > 1 and b"python" in argv[0] and argv[1].decode() == SERVER_ARGV1:
                return pid
        raise AssertionError(f"no {SERVER_ARGV1} below buildah run {self.proc.pid}")

    def terminate(self) -> None:
        os.kill(self.server_pid(), signal.SIGTERM)


@pytest.fixture(scope="module")
def container() -> Iterator[str]:
    name = f"lstm-serve-test-{secrets.token_hex(4)}"
    buildah("from", "--pull-never", "--name", name, IMAGE)
    try:
        yield name
    finally:
        buildah("rm", name)


@pytest.fixture(scope="module")
def server(container: str) -> Iterator[ImageServer]:
    running = ImageServer(container)
    try:
        running.wait_event("ready", 90)
        yield running
    finally:
        if running.proc.poll() is None:
            running.proc.kill()


def in_image(container: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """A second process in the running container (its own user and network, as `docker exec`)."""
    return subprocess.run(
        ["buildah", "run", "--isolation", "chroot", "--network", "host", "--user", USER,
         container, "--", *argv],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_image_is_small_and_configured_to_run_non_root() -> None:
    size = buildah("images", "--format", "{{.Size}}", IMAGE).strip()
    number, unit = re.fullmatch(r"([\d.]+)\s*([kMG]B)", size).groups()  # type: ignore[union-attr]
    megabytes = float(number) * {"kB": 1e-3, "MB": 1.0, "GB": 1e3}[unit]
    print(f"{IMAGE}: {size}")
    assert megabytes <= MAX_CPU_IMAGE_MB, f"the CPU image is {size}"
    config = json.loads(buildah("inspect", "--type", "image", IMAGE))["Docker"]["config"]
    assert config["User"] == USER and config["Entrypoint"] == ["lstm-serve"]
    assert set(config["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "8002/tcp"}
    assert config["Healthcheck"]["Test"] == ["CMD", "python", "/app/healthcheck.py"]
    assert "LSTM_SERVE_MODEL_REPOSITORY=/app/models" in config["Env"]


def test_it_serves_as_its_user_and_is_ready_over_http(server: ImageServer) -> None:
    uid = next(
        line.split()[1]
        for line in Path(f"/proc/{server.server_pid()}/status").read_text().splitlines()
        if line.startswith("Uid:")
    )
    assert uid == USER.split(":")[0]
    status, _ = get(f"http://127.0.0.1:{server.http_port}/v2/health/ready")
    assert status == 200
    status, body = get(f"http://127.0.0.1:{server.http_port}/v2/models/langid-chars")
    assert status == 200 and json.loads(body)["name"] == "langid-chars"


def test_the_images_lstm_client_lists_and_classifies_over_grpc(
    server: ImageServer, container: str
) -> None:
    address = f"127.0.0.1:{server.port}"
    listed = in_image(container, "lstm-client", "--address", address, "list")
    assert listed.returncode == 0, listed.stderr
    assert "langid-chars v1" in listed.stdout and "speaker-vowels v1" in listed.stdout
    classified = in_image(
        container, "lstm-client", "--address", address, "classify", "langid-chars",
        "--text", "Schmetterling",
    )  # fmt: skip
    assert classified.returncode == 0 and "german" in classified.stdout, classified.stderr


def test_the_healthcheck_script_reports_serving(server: ImageServer, container: str) -> None:
    checked = in_image(container, "python", "/app/healthcheck.py", str(server.port))
    assert checked.returncode == 0, checked.stderr


def test_the_tritonclient_sequence_program_runs_unchanged(
    server: ImageServer, tmp_path: Path
) -> None:
    (program,) = blocks("python")
    script = tmp_path / "triton_sequence.py"
    script.write_text(program, encoding="utf-8")
    env = {**os.environ, "TRITON_URL": server.address}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    same_text_close_numbers(done.stdout, blocks("")[0])


def test_metrics_are_served(server: ImageServer) -> None:
    status, body = get(f"http://127.0.0.1:{server.metrics_port}/metrics")
    text = body.decode()
    assert status == 200
    assert re.search(r'^lstm_serve_model_info\{[^}]*model="langid-chars"', text, re.M), text[:2000]


def session_replies(address: str) -> list[pb.StreamResponse]:
    """A Stream session of several chunks, its replies with the session id blanked."""
    chunks = ["Guten ", "Morgen, ", "wie geht ", "es dir?"]
    opened = pb.OpenSession(model="langid-chars", options=pb.StreamOptions(top_k=3))
    requests = [pb.StreamRequest(open=opened)]
    requests += [pb.StreamRequest(chunk=pb.Chunk(seq=i, input=pb.SequenceInput(text=text)))
                 for i, text in enumerate(chunks, 1)]  # fmt: skip
    requests.append(pb.StreamRequest(end=pb.End()))
    with grpc.insecure_channel(address) as channel:
        replies = list(pb_grpc.LstmServeStub(channel).Stream(iter(requests), timeout=60))
    for reply in replies:
        reply.session_id = ""
        if reply.HasField("opened"):
            reply.opened.session_id = ""
    return replies


def argv0(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return b""  # ended meanwhile


def test_the_native_front_serves_a_stream_session_as_the_python_front(
    server: ImageServer, container: str
) -> None:
    """LSTM_SERVE_NATIVE_FRONT=true: lstm-serve runs the image's /usr/local/bin/lstm-serve-front
    (as the image's user) on the gRPC port; a session's replies are the Python front's; SIGTERM
    stops both, exit status 0."""
    native = ImageServer(container, "LSTM_SERVE_NATIVE_FRONT=true")
    try:
        native.wait_event("ready", 90)
        fronts = [pid for pid in descendants(native.server_pid())
                  if argv0(pid) == b"/usr/local/bin/lstm-serve-front"]  # fmt: skip
        assert len(fronts) == 1, "".join(native.lines[-20:])
        status = Path(f"/proc/{fronts[0]}/status").read_text()
        assert f"Uid:\t{USER.split(':')[0]}\t" in status
        got, expected = session_replies(native.address), session_replies(server.address)
        assert got == expected and len(got) == 6 and got[-1].HasField("ended")
        native.terminate()
        assert native.proc.wait(60) == 0, "".join(native.lines[-20:])
        assert argv0(fronts[0]) == b"" and "Traceback" not in "".join(native.lines)
    finally:
        if native.proc.poll() is None:
            native.proc.kill()


def test_sigterm_drains_an_open_stream_and_exits_cleanly(server: ImageServer) -> None:
    """Last in this module: it stops the server."""
    requests: queue.Queue[pb.StreamRequest | None] = queue.Queue()

    def outgoing() -> Iterator[pb.StreamRequest]:
        while (request := requests.get()) is not None:
            yield request

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        replies = pb_grpc.LstmServeStub(channel).Stream(outgoing())
        requests.put(pb.StreamRequest(open=pb.OpenSession(model="langid-chars")))
        assert next(replies).HasField("opened")
        chunk = pb.Chunk(seq=1, input=pb.SequenceInput(text="hallo "))
        requests.put(pb.StreamRequest(chunk=chunk))
        assert next(replies).chunk.steps > 0
        server.terminate()
        assert health_after_sigterm(health) != health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as ended:
            for _ in replies:
                pass
        requests.put(None)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert server.proc.wait(60) == 0, "".join(server.lines[-20:])
    assert server.wait_event("draining", 1)
    assert server.wait_event("stopped", 1)["drained"] is True
    assert "Traceback" not in "".join(server.lines)


def health_after_sigterm(health: health_pb2_grpc.HealthStub) -> int:
    """The first health answer other than SERVING, or NOT_SERVING once the server is gone (an
    idle server drains at once and may stop before the next check: the check then fails
    UNAVAILABLE, or CANCELLED when it was in flight as the server stopped)."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as exc:
            gone = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert exc.code() in gone, exc
            return health_pb2.HealthCheckResponse.NOT_SERVING
        if status != health_pb2.HealthCheckResponse.SERVING:
            return status
        time.sleep(0.05)
    return health_pb2.HealthCheckResponse.SERVING
