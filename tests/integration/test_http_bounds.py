"""The bounds of KServe v2 requests on a real in-process server: each flag does what its help
says (service/config.py), judged from what a request declares, before the work it would cost.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.grpc import service_pb2_grpc as tpb_grpc

from service.triton import http_body, tensors
from tests.integration.conftest import ServerThread, make_config, wait_for

INFER = "/v2/models/tiny-lstm/infer"


@pytest.fixture(scope="module")
def srv(tiny_repo: Path) -> Iterator[ServerThread]:
    config = make_config(tiny_repo, max_bytes_elements=8, http_max_body_bytes=4 << 20,
                         http_max_inflate_ratio=20, http_body_timeout_s=1.0,
                         http_idle_timeout_s=1.0, read_ahead_total_bytes=8 << 20)  # fmt: skip
    server = ServerThread(config).start()
    yield server
    server.stop()


def port_of(srv: ServerThread) -> int:
    assert srv.app is not None and srv.app.http_port
    return srv.app.http_port


def post(srv: ServerThread, body: bytes, headers: dict[str, str] | None = None,
         path: str = INFER) -> tuple[int, str]:  # fmt: skip
    connection = http.client.HTTPConnection("127.0.0.1", port_of(srv), timeout=30)
    try:
        connection.request("POST", path, body, headers or {})
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    return response.status, json.loads(data)["error"] if response.status != 200 else ""


def binary_body(tensor: dict[str, object], raw: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": [tensor]}).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def text_tensor(count: int, size: int) -> dict[str, object]:
    return {"name": "text", "datatype": "BYTES", "shape": [count],
            "parameters": {"binary_data_size": size}}  # fmt: skip


# -- --max-bytes-elements ------------------------------------------------------------------------


def test_bytes_elements_past_the_flag_are_refused_over_http_and_grpc(srv: ServerThread) -> None:
    body, headers = binary_body(text_tensor(9, 36), bytes(36))
    status, error = post(srv, body, headers)
    assert status == 400 and "at most 8 per request (--max-bytes-elements)" in error
    json_body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [9],
                                        "data": ["a"] * 9}]}).encode()  # fmt: skip
    assert post(srv, json_body)[0] == 400
    request = tpb.ModelInferRequest(model_name="tiny-lstm")
    request.inputs.add(name="text", datatype="BYTES", shape=[9])
    request.raw_input_contents.append(tensors.serialize_bytes(np.array([b"a"] * 9)))
    with grpc.insecure_channel(srv.address) as channel, pytest.raises(grpc.RpcError) as info:
        tpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-bytes-elements" in (info.value.details() or "")


def test_grpc_typed_contents_of_the_wrong_count_are_refused_before_a_copy() -> None:
    from service.triton import grpc_codec

    request = tpb.ModelInferRequest(model_name="m")
    request.inputs.add(
        name="tokens", datatype="INT64", shape=[1, 2]
    ).contents.int64_contents.extend([1] * 100_000)
    with pytest.raises(Exception, match="100000 values, expected 2"):
        grpc_codec.infer_request(request)
    request = tpb.ModelInferRequest(model_name="m")
    request.inputs.add(name="text", datatype="BYTES", shape=[1] * 100)
    with pytest.raises(Exception, match="100 dimensions"):
        grpc_codec.infer_request(request)


# -- sizes: declared, inflated --------------------------------------------------------------------


def test_a_declared_length_past_the_limit_is_413_before_the_body_is_sent(srv: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", port_of(srv)), timeout=5) as sock:
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 1073741824\r\n\r\n")  # fmt: skip
        response = http.client.HTTPResponse(sock)
        response.begin()  # no byte of the body sent
        assert response.status == 413 and b"--http-max-body-bytes" in response.read()


def test_binary_sizes_that_disagree_with_the_length_are_400_before_reading(
    srv: ServerThread,
) -> None:
    tensor = {"name": "tokens", "datatype": "INT64", "shape": [1, 2],
              "parameters": {"binary_data_size": 16}}  # fmt: skip
    header = json.dumps({"inputs": [tensor]}).encode()
    with socket.create_connection(("127.0.0.1", port_of(srv)), timeout=5) as sock:
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     + str(len(header) + (1 << 20)).encode() + b"\r\n"
                     + b"Inference-Header-Content-Length: " + str(len(header)).encode()
                     + b"\r\n\r\n" + header)  # fmt: skip
        response = http.client.HTTPResponse(sock)
        response.begin()  # the 1 MiB rest never sent
        assert response.status == 400 and b"add up to 16" in response.read()


def test_a_compressed_body_past_the_inflate_ratio_is_413_naming_the_flag(srv: ServerThread) -> None:
    zeros = struct.pack("<3q", 1, 2, 3) + bytes(3 << 20)  # fits the size limit, not the ratio
    tensor = {"name": "tokens", "datatype": "INT64", "shape": [1, len(zeros) // 8],
              "parameters": {"binary_data_size": len(zeros)}}  # fmt: skip
    body, headers = binary_body(tensor, zeros)
    status, error = post(srv, gzip.compress(body), {**headers, "Content-Encoding": "gzip"})
    assert status == 413 and "--http-max-inflate-ratio" in error
    fine = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3],
                                   "data": [1, 2, 3]}]}).encode()  # fmt: skip
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)  # raw deflate, as some clients send it
    raw = packer.compress(fine) + packer.flush()
    assert post(srv, raw, {"Content-Encoding": "deflate"})[0] == 200
    assert post(srv, fine, {"Content-Encoding": "br"})[0] == 415


# -- time: slow bodies, idle connections ----------------------------------------------------------


def test_slow_uploads_hold_only_what_they_sent_then_get_408(srv: ServerThread) -> None:
    assert srv.app is not None
    budget = srv.app.triton.read_ahead
    socks = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", port_of(srv)), timeout=5)
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                     b"4000000\r\nInference-Header-Content-Length: 100\r\n\r\n{")  # fmt: skip
        socks.append(sock)
    try:
        wait_for(lambda: budget.used > 0, 5, "the uploads to hold their first bytes")
        assert budget.used <= 4 * http_body.FIRST_HOLD  # not 4 x 4 MB declared
        ok = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2],
                                     "data": [1, 2]}]}).encode()  # fmt: skip
        started = time.monotonic()
        assert post(srv, ok)[0] == 200 and time.monotonic() - started < 0.5
        for sock in socks:  # the body deadline (1 s): 408, the partial body dropped
            response = http.client.HTTPResponse(sock)
            response.begin()
            assert response.status == 408 and b"--http-body-timeout-s" in response.read()
        wait_for(lambda: budget.used == 0, 5, "the budget to be given back")
    finally:
        for sock in socks:
            sock.close()


def test_idle_and_half_sent_header_connections_are_closed(srv: ServerThread) -> None:
    idle = socket.create_connection(("127.0.0.1", port_of(srv)), timeout=5)
    half = socket.create_connection(("127.0.0.1", port_of(srv)), timeout=5)
    half.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    for sock in (idle, half):
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""  # closed by the server after --http-idle-timeout-s
        sock.close()
    assert 0.5 < time.monotonic() - started < 4


def test_a_started_body_that_cannot_grow_gets_429_after_its_wait(
    tiny_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies that each hold part of the budget do not wait on each other for good."""
    monkeypatch.setattr(http_body, "GROW_WAIT_S", 0.3)
    config = make_config(tiny_repo, read_ahead_total_bytes=256 << 10, read_ahead_bytes=64 << 10,
                         http_body_timeout_s=10.0)  # fmt: skip
    server = ServerThread(config).start()
    try:
        assert server.app is not None
        budget = server.app.triton.read_ahead

        async def take(size: int) -> None:
            budget.take(size) if size > 0 else budget.give_back(-size)

        server.call(take(100 << 10))  # held by someone else (a stream's read-ahead, say)
        body, headers = binary_body(text_tensor(1, 4 + (1 << 20)), struct.pack("<I", 1 << 20)
                                    + bytes(1 << 20))  # fmt: skip
        head, rest = body.split(b"]}", 1)
        with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
            sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nInference-Header-Content-Length: "
                         + headers["Inference-Header-Content-Length"].encode() + b"\r\n\r\n"
                         + head)  # fmt: skip
            wait_for(lambda: budget.used > 100 << 10, 5, "the body's first hold")
            with contextlib.suppress(OSError):  # the server may answer and close meanwhile
                sock.sendall(b"]}" + rest)
            response = http.client.HTTPResponse(sock)
            response.begin()
            result = [(response.status, json.loads(response.read())["error"])]
        server.call(take(-(100 << 10)))
        assert result and result[0][0] == 429 and "--read-ahead-total-bytes" in result[0][1]
        wait_for(lambda: budget.used == 0, 5, "the budget to be given back")
    finally:
        server.stop()
