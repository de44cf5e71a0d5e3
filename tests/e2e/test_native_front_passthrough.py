"""The native front's pass-through (native/src/proxy.cc) when the server behind it is gone: every
call ends UNAVAILABLE, the front stays up, and it answers again once a server is back."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from bench.procs import serving
from tests.e2e.conftest import ROOT, ServerProcess
from tests.native_front import NativeFront, binary

CALLS = 20_000  # the front before the fix died after 70-5,460 such calls (not always within 10,000)
HAMMER_S = 30.0  # at most this long
WORKERS = 8


def hammer(address: str, front: NativeFront) -> Counter[str]:
    """CALLS pass-through calls over WORKERS threads (half bidi calls that write 50 messages, half
    unary), stopping early if the front exits -> how many ended with each status."""
    codes: Counter[str] = Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + HAMMER_S

    def messages():
        yield from (b"\x00" * 16 for _ in range(50))

    def work(bidi: bool) -> None:
        with grpc.insecure_channel(address) as channel:
            multi = channel.stream_stream("/lstmserve.v1.LstmServe/StreamMulti")
            check = channel.unary_unary("/grpc.health.v1.Health/Check")
            while time.monotonic() < deadline and front.proc.poll() is None:
                with lock:
                    if sum(codes.values()) >= CALLS:
                        return
                try:
                    if bidi:
                        for _ in multi(messages(), timeout=5):
                            pass
                    else:
                        check(b"", timeout=5)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[code] += 1

    threads = [threading.Thread(target=work, args=(i % 2 == 0,)) for i in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return codes


def serving_through(address: str, timeout_s: float) -> bool:
    """Whether health through `address` says SERVING within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if serving(stub):
                return True
            time.sleep(0.05)
    return False


def test_pass_through_calls_to_a_gone_server_leave_the_front_up_and_it_answers_once_back(
    tmp_path: Path,
) -> None:
    """With no server behind it, each pass-through call's upstream ends at once, before the
    client's messages and half-close reach it (what every call in flight sees when a replica is
    killed behind a front that stays up): all end UNAVAILABLE, the front survives, and health
    through it is SERVING within seconds of a server starting on the same sockets."""
    binary()
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    front = NativeFront(sockets)
    server = None
    try:
        codes = hammer(front.address, front)
        alive = front.proc.poll() is None
        assert alive, f"the front died ({front.proc.returncode}) after {dict(codes)} calls"
        assert set(codes) == {"UNAVAILABLE"} and sum(codes.values()) >= CALLS, codes
        server = ServerProcess(ROOT / "models", "--native-front-dir", str(sockets))
        server.wait_event("ready", 60)
        assert serving_through(front.address, 10.0)
    finally:
        if server is not None:
            server.stop()
        out = front.stop()
    assert '"event": "stopped"' in out  # it exited on SIGTERM as it should, not by a crash
