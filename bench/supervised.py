"""lstm-serve --native-front, timed: how long a SIGKILLed front leaves the port unanswered, and
how long SIGTERM takes to stop lstm-serve with a stream open, against the Python front.

    python -m bench.supervised [--rounds 3]

Each round starts its servers on 127.0.0.1 (free ports) and stops them; nothing else is sent.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
FRONT = ROOT / "native" / "build" / "lstm-serve-front"
DEADLINE_S = 30.0


class Server:
    """lstm-serve (JSON logs on stderr read in a thread) on free ports of 127.0.0.1."""

    def __init__(self, *flags: str) -> None:
        argv = [sys.executable, "-m", "service.cli", "--log-json", "--host", "127.0.0.1",
                "--grpc-port", "0", "--metrics-port", "-1", "--http-port", "-1",
                "--model-repository", str(ROOT / "models"), "--snapshot-key", "k1:" + "A" * 44,
                "--drain-grace-s", "5", *flags]  # fmt: skip
        self.proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.port = int(self.wait("listening")["grpc_port"])
        self.wait("ready")

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def wait(self, name: str) -> dict:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event.get("event") == name:
                return event
        raise RuntimeError(f"no {name!r} from lstm-serve within {DEADLINE_S} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE_S)


def front_pid(server: Server) -> int:
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text()
    return int(children.split()[0])


def opens(address: str) -> bool:
    """One session opened and ended through `address` within 1 s."""
    requests = [pb.StreamRequest(open=pb.OpenSession(model="langid-chars")),
                pb.StreamRequest(end=pb.End())]  # fmt: skip
    try:
        with grpc.insecure_channel(address) as channel:
            list(pb_grpc.LstmServeStub(channel).Stream(iter(requests), timeout=1.0))
        return True
    except grpc.RpcError:
        return False


def restart_gap_s(server: Server) -> float:
    """SIGKILL the front; seconds until a session opens through the port again."""
    address = f"127.0.0.1:{server.port}"
    assert opens(address)
    os.kill(front_pid(server), signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(0.01)  # the killed front's listener is gone
    while not opens(address):
        if time.monotonic() - killed > DEADLINE_S:
            raise RuntimeError("the front did not come back")
        time.sleep(0.005)
    return time.monotonic() - killed


def drain_s(server: Server) -> float:
    """A stream open (one chunk answered), then SIGTERM: seconds until lstm-serve exited."""
    more: queue.Queue[pb.StreamRequest] = queue.Queue()
    more.put(pb.StreamRequest(open=pb.OpenSession(model="langid-chars")))
    more.put(pb.StreamRequest(chunk=pb.Chunk(seq=1, input=pb.SequenceInput(text="hallo"))))

    def requests():
        while (request := more.get()) is not None:
            yield request

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        replies = pb_grpc.LstmServeStub(channel).Stream(requests(), timeout=DEADLINE_S)
        next(replies), next(replies)
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        try:
            for _ in replies:
                pass
        except grpc.RpcError:
            pass
        more.put(None)  # type: ignore[arg-type]
        code = server.proc.wait(DEADLINE_S)
    if code != 0:
        raise RuntimeError(f"lstm-serve exited {code}")
    return time.monotonic() - signalled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, choices=range(1, 21))
    args = parser.parse_args()
    native = ("--native-front", "--native-front-bin", str(FRONT))
    gaps, drains = [], {"native": [], "python": []}
    for _ in range(args.rounds):
        server = Server(*native)
        try:
            gaps.append(restart_gap_s(server))
            drains["native"].append(drain_s(server))
        finally:
            server.stop()
        server = Server()
        try:
            drains["python"].append(drain_s(server))
        finally:
            server.stop()
    print(json.dumps({
        "rounds": args.rounds, "load_average": os.getloadavg(),
        "front_restart_gap_ms": [round(g * 1e3, 1) for g in gaps],
        "front_restart_gap_ms_median": round(statistics.median(gaps) * 1e3, 1),
        "sigterm_to_exit_s": {k: [round(v, 3) for v in vs] for k, vs in drains.items()},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
