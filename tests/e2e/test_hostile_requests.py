"""Hostile KServe v2 requests against a real lstm-serve process: each is refused at a cost that
does not grow with what it asks for, while a victim's native stream, sending a character every
50 ms, keeps its round trips short.

Measured per case: the victim's worst chunk latency (under 0.5 s), the server's peak RSS
growth (VmHWM after resetting it, under 400 MiB), the refusal's status, and that the log holds
no ERROR and no traceback. Loopback only, bounded counts and times.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.e2e.conftest import ServerProcess

MiB = 1 << 20
WORST_S = 0.5
RSS_BOUND = 400 * MiB
IDLE_S, BODY_S = 2.0, 4.0  # the server's --http-idle-timeout-s and --http-body-timeout-s
FIGURES: dict[str, dict[str, Any]] = {}  # what each case measured (printed at the end)


@pytest.fixture(scope="module")
def server(tiny_repo: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_repo, "--http-idle-timeout-s", str(IDLE_S),
                         "--http-body-timeout-s", str(BODY_S))  # fmt: skip
    proc.wait_event("ready")
    yield proc
    proc.stop()
    print("\nhostile figures:", json.dumps(FIGURES, indent=1))


# -- measuring -----------------------------------------------------------------------------------


class Victim:
    """A native Stream on its own thread: one character every 50 ms, each round trip timed."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.latencies: list[tuple[float, float]] = []  # (sent at, seconds)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Victim:
        self._thread.start()
        assert self._ready.wait(10), "the victim stream did not open"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            call = pb_grpc.LstmServeStub(channel).Stream()
            await call.write(pb.StreamRequest(open=pb.OpenSession(model="tiny-lstm")))
            await call.read()
            self._ready.set()
            seq = 0
            while not self._stop.is_set():
                seq += 1
                sent = time.monotonic()
                chunk = pb.Chunk(seq=seq, input=pb.SequenceInput(text="ab"[seq % 2]))
                await call.write(pb.StreamRequest(chunk=chunk))
                reply = await call.read()
                assert reply.WhichOneof("kind") == "chunk", reply
                self.latencies.append((sent, time.monotonic() - sent))
                await asyncio.sleep(max(0.0, 0.05 - (time.monotonic() - sent)))
            await call.done_writing()

    def worst_since(self, start: float) -> float:
        """The worst round trip of the chunks sent since `start`, waiting for one sent after
        now to come back (a chunk stalled behind the hostile work counts)."""
        now = time.monotonic()
        deadline = now + 60
        while not any(sent > now for sent, _ in self.latencies):
            assert time.monotonic() < deadline, "the victim stream stalled for a minute"
            time.sleep(0.02)
        return max(seconds for sent, seconds in self.latencies if sent >= start)


def status(server: ServerProcess, key: str) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


def measured(server: ServerProcess, name: str, attack: Callable[[], Any]) -> Any:
    """Run `attack` beside a victim stream; check and record the victim's worst latency over
    the attack and one second after it, and the server's peak RSS growth."""
    Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before, lines = status(server, "VmRSS"), len(server.lines)
    with Victim(server.address) as victim:
        start = time.monotonic()
        result = attack()
        took = time.monotonic() - start
        time.sleep(1.0)  # the loop must not stay busy after the refusal either
        worst = victim.worst_since(start)
    growth = status(server, "VmHWM") - before
    FIGURES[name] = {"victim_worst_s": round(worst, 3), "rss_growth_mib": round(growth / MiB, 1),
                     "seconds": round(took, 2), "result": str(result)[:80]}  # fmt: skip
    assert worst < WORST_S, FIGURES[name]
    assert growth < RSS_BOUND, FIGURES[name]
    assert_no_error_logged(server, lines)
    return result


def assert_no_error_logged(server: ServerProcess, since: int) -> None:
    time.sleep(0.1)
    for line in server.lines[since:]:
        assert "Traceback" not in line, line
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            assert entry.get("level") not in ("ERROR", "CRITICAL"), line
            assert "exception" not in entry, line


# -- raw HTTP -----------------------------------------------------------------------------------


def post(server: ServerProcess, headers: dict[str, str], body: bytes, path: str = "",
         close_after: int | None = None) -> tuple[int, str]:  # fmt: skip
    """POST `body` on its own connection (sent by a thread, as fast as the server reads it);
    the status and the error, or (0, "") when the server closed without an answer.
    `close_after`: send that many bytes of the body, then close the connection."""
    path = path or "/v2/models/tiny-lstm/infer"
    head = f"POST {path} HTTP/1.1\r\nHost: lstm-serve\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)

    def send() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(head.encode())
            sock.sendall(body if close_after is None else body[:close_after])
            if close_after is not None:
                sock.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    if close_after is not None:
        sender.join(30)
        return 0, ""
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
    except (OSError, http.client.HTTPException):
        return 0, ""
    finally:
        sock.close()
        sender.join(30)
    return response.status, json.loads(data).get("error", "") if data else ""


def binary_infer(inputs: list[dict[str, Any]], binary: bytes) -> tuple[dict[str, str], bytes]:
    header = json.dumps({"inputs": inputs}).encode()
    return {"Inference-Header-Content-Length": str(len(header))}, header + binary


def empty_bytes_body(count: int) -> tuple[dict[str, str], bytes]:
    """A BYTES tensor of `count` empty elements (4 bytes each) in the binary extension."""
    size = 4 * count
    tensor = {"name": "text", "datatype": "BYTES", "shape": [count],
              "parameters": {"binary_data_size": size}}  # fmt: skip
    return binary_infer([tensor], bytes(size))


# -- the cases ----------------------------------------------------------------------------


def test_a_64_mib_body_of_16_m_empty_bytes_elements_is_refused_at_once(
    server: ServerProcess,
) -> None:
    headers, body = empty_bytes_body(16 * MiB - 64)
    assert len(body) < 64 * MiB
    code, error = measured(server, "bytes_64mib", lambda: post(server, headers, body))
    assert code == 400 and "--max-bytes-elements" in error, error


def test_its_gzip_form_is_refused_after_inflating_the_header_only(server: ServerProcess) -> None:
    headers, body = empty_bytes_body(16 * MiB - 64)
    packed = gzip.compress(body, compresslevel=6)
    assert len(packed) < 128 << 10
    headers["Content-Encoding"] = "gzip"
    code, error = measured(server, "bytes_64mib_gzip", lambda: post(server, headers, packed))
    assert code == 400 and "--max-bytes-elements" in error, error


def test_a_1_gib_gzip_bomb_is_refused_within_its_bounds(server: ServerProcess) -> None:
    """As a JSON body (refused past the 8 MiB JSON limit) and as a binary body whose header declares
    60 MiB (refused once it inflates past --http-max-inflate-ratio, or past the 60 MiB)."""
    steps = 60 * MiB // 8
    headers, header = binary_infer(
        [
            {
                "name": "tokens",
                "datatype": "INT64",
                "shape": [1, steps],
                "parameters": {"binary_data_size": 8 * steps},
            }
        ],
        b"",
    )
    headers["Content-Encoding"] = "gzip"
    for name, head, answers in (("bomb_json", b"", (413,)), ("bomb_binary", header, (400, 413))):
        packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
        zeros = bytes(64 * MiB)
        parts = [packer.compress(head)] + [packer.compress(zeros) for _ in range(16)]
        bomb = b"".join([*parts, packer.flush()])
        assert len(bomb) < 2 * MiB  # 1 GiB inflated
        sent = headers if head else {"Content-Encoding": "gzip"}
        code, error = measured(server, name, lambda b=bomb, h=sent: post(server, h, b))
        assert code in answers, (name, code, error)


def test_ten_4_mib_bytes_messages_on_model_stream_infer_are_refused_in_band(
    server: ServerProcess,
) -> None:
    count = (4 * MiB - 256) // 4

    def attack() -> list[str]:
        request = tpb.ModelInferRequest(model_name="tiny-lstm")
        request.inputs.add(name="text", datatype="BYTES", shape=[count])
        request.raw_input_contents.append(bytes(4 * count))
        assert request.ByteSize() < 4 * MiB
        with grpc.insecure_channel(server.address) as channel:
            replies = tpb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([request] * 10), timeout=60
            )
            return [r.error_message for r in replies]

    errors = measured(server, "stream_infer_10x4mib", attack)
    assert len(errors) == 10 and all("--max-bytes-elements" in e for e in errors), errors[:1]


def test_a_normal_infer_answers_beside_slow_uploads_and_slowloris(server: ServerProcess) -> None:
    """Four uploads declaring 64 MiB and sending a byte a second hold (nearly) nothing of the
    body budget; 300 connections sending their headers byte by byte hold nothing but a socket;
    the server closes them all (408 / the idle timeout)."""
    lines = len(server.lines)
    uploads = [_slow_upload(server) for _ in range(4)]
    loris = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(300)]
    stop = threading.Event()
    trickle = threading.Thread(target=_trickle, args=(uploads, loris, stop), daemon=True)
    trickle.start()
    try:
        time.sleep(0.3)
        headers, body = binary_infer([{"name": "tokens", "datatype": "INT64", "shape": [1, 3],
                                       "parameters": {"binary_data_size": 24}}],
                                     struct.pack("<3q", 1, 2, 3))  # fmt: skip
        start = time.monotonic()
        code, error = post(server, headers, body)
        took = time.monotonic() - start
        FIGURES["beside_slow_peers"] = {"normal_infer_s": round(took, 3)}
        assert code == 200 and took < 2.0, (code, error, took)
        closed_at = _wait_closed(loris, IDLE_S + 3)
        answers = [_response_of(s, BODY_S + 3) for s in uploads]
        FIGURES["beside_slow_peers"].update(slowloris_closed_after_s=round(closed_at, 2),
                                            uploads=answers)  # fmt: skip
        assert answers == [408] * 4, answers
    finally:
        stop.set()
        trickle.join(10)
        for s in uploads + loris:
            s.close()
    assert_no_error_logged(server, lines)


def _slow_upload(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port))
    sock.sendall(b"POST /v2/models/tiny-lstm/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 67108864\r\nInference-Header-Content-Length: 200\r\n"
                 b"\r\n{")  # fmt: skip
    return sock


def _trickle(uploads: list[socket.socket], loris: list[socket.socket],
             stop: threading.Event) -> None:  # fmt: skip
    """A body byte a second on each upload; the next header byte on each slowloris socket
    every 0.2 s."""
    header = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 4096
    i = 0
    while not stop.wait(0.2):
        for sock in loris:
            with contextlib.suppress(OSError):
                sock.send(header[i : i + 1])
        if i % 5 == 0:
            for sock in uploads:
                with contextlib.suppress(OSError):
                    sock.send(b" ")
        i += 1


def _wait_closed(socks: list[socket.socket], timeout: float) -> float:
    """Seconds until the server closed every socket (EOF or reset)."""
    start = time.monotonic()
    for sock in socks:
        sock.settimeout(max(0.01, timeout - (time.monotonic() - start)))
        try:
            while sock.recv(65536):
                pass
        except TimeoutError:
            raise AssertionError(f"a slowloris connection is open after {timeout} s") from None
        except OSError:
            pass  # reset: closed
    return time.monotonic() - start


def _response_of(sock: socket.socket, timeout: float) -> int:
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
    except (OSError, http.client.HTTPException):
        return 0
    return response.status


# -- client mistakes: 400, one WARNING line, no traceback -----------------------------------------

TOKENS = {"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}
MALFORMED = {
    "5000-digit integer": b'{"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 1],'
                          b' "data": [' + b"9" * 5000 + b"]}]}",
    "100-dimension shape": json.dumps({"inputs": [{**TOKENS, "shape": [1] * 100}]}).encode(),
    "huge dimension beside a 0": json.dumps({"inputs": [{**TOKENS,
                                                         "shape": [0, 10**30]}]}).encode(),
    "lone surrogate in data": b'{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],'
                              b' "data": ["\\ud800"]}]}',
    "lone surrogate in sequence_id": json.dumps({"inputs": [TOKENS], "parameters": {
        "sequence_id": "\ud800", "sequence_start": True}}).encode(),
    "lone surrogate in a name": json.dumps({"inputs": [{**TOKENS, "name": "\udfff"}]}).encode(),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_json_is_400_with_one_warning(server: ServerProcess, case: str) -> None:
    lines = len(server.lines)
    code, error = post(server, {}, MALFORMED[case])
    assert code == 400, (code, error)
    _one_warning(server, lines)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_an_invalid_compressed_body_is_400_with_one_warning(
    server: ServerProcess, encoding: str
) -> None:
    lines = len(server.lines)
    body = zlib.compress(json.dumps({"inputs": [TOKENS]}).encode())[:-6] + b"garbage!"
    code, error = post(server, {"Content-Encoding": encoding}, body)
    assert code == 400 and "compressed" in error, (code, error)
    _one_warning(server, lines)


def test_a_client_that_disconnects_mid_body_is_no_error(server: ServerProcess) -> None:
    lines = len(server.lines)
    body = json.dumps({"inputs": [TOKENS]}).encode() + b" " * 100_000
    post(server, {}, body, close_after=1000)
    chunked = (b"POST /v2/models/tiny-lstm/infer HTTP/1.1\r\nHost: x\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\nzz\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", server.http_port)) as sock:
        sock.sendall(chunked)  # a broken chunk size: aiohttp's RequestPayloadError
        sock.settimeout(5)
        with contextlib.suppress(OSError):
            sock.recv(4096)
    time.sleep(0.3)
    assert_no_error_logged(server, lines)
    code, _ = post(server, {}, json.dumps({"inputs": [TOKENS]}).encode())
    assert code == 200


def _one_warning(server: ServerProcess, since: int) -> None:
    assert_no_error_logged(server, since)
    warnings = [ln for ln in server.lines[since:] if '"WARNING"' in ln]
    assert len(warnings) == 1, warnings


def test_an_8_mib_json_body_of_4_m_numbers_is_parsed_off_the_loop(server: ServerProcess) -> None:
    n = (8 * MiB - 200) // 2
    body = b'{"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, %d], "data": [' % n
    body += b"0," * (n - 1) + b"0]}]}"
    code, error = measured(server, "json_8mib_numbers", lambda: post(server, {}, body))
    assert code == 400 and "steps" in error, error  # decoded, then refused by the model's limit
