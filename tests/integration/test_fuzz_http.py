"""Fuzzing the KServe v2 HTTP/REST front as tests/integration/test_fuzz.py fuzzes gRPC.

Hostile bodies (numbers of thousands of digits, lone surrogates, shapes of 100 dimensions or
huge ones, binary parts of the wrong size, broken or truncated gzip / deflate, unknown
encodings, odd header lengths), methods and paths go to a running server. Every answer must be
one a client can act on (never a 500), an error is `{"error": ...}`, nothing is logged at ERROR,
and afterwards the server still answers an ordinary request.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import ServerThread, make_config
from tests.integration.test_triton_http import JSON_VALUES, REQUESTS, nearly_valid

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ACTIONABLE = {200, 400, 404, 405, 408, 409, 413, 415, 429, 501, 503}


class Errors(logging.Handler):
    """Records at ERROR or above, from any logger (the server runs in this process)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def fuzzed(tiny_repo: Path) -> Iterator[tuple[ServerThread, Errors]]:
    errors = Errors()
    logging.getLogger().addHandler(errors)
    srv = ServerThread(make_config(tiny_repo, max_bytes_elements=64,
                                   http_max_body_bytes=1 << 20)).start()  # fmt: skip
    yield srv, errors
    srv.stop()
    logging.getLogger().removeHandler(errors)


# -- strategies ---------------------------------------------------------------------------------


class Raw:
    """JSON text put as it is into a document (what json.dumps cannot write: 5,000 digits)."""

    def __init__(self, text: str) -> None:
        self.text = text


def to_json(doc: object) -> bytes:
    raws: list[str] = []

    def placeholder(value: object) -> str:
        assert isinstance(value, Raw)
        raws.append(value.text)
        return f"\x00raw{len(raws) - 1}\x00"

    text = json.dumps(doc, default=placeholder)
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw)
    return text.encode()


SURROGATES = st.text(st.characters(exclude_categories=()), max_size=6)  # lone ones included
HOSTILE_NUMBERS = st.sampled_from(["9" * 5000, "-" + "9" * 4400, "1e999", "-0", "NaN",
                                   "Infinity", "1" * 400]).map(Raw)  # fmt: skip
LEAVES = SURROGATES | HOSTILE_NUMBERS | st.integers(-(2**70), 2**70)
HOSTILE_SHAPES = (
    st.lists(st.integers(0, 2), min_size=17, max_size=100)
    | st.lists(st.integers(0, 10**30) | st.sampled_from([0, 1, 2**62, 2**64]), max_size=5)
    | st.lists(HOSTILE_NUMBERS, max_size=3)
)


@st.composite
def hostile_request(draw: st.DrawFn) -> dict[str, Any]:
    """A request with a hostile value put somewhere a decoder reads."""
    name = draw(st.sampled_from(["tokens", "text", "features"]) | SURROGATES)
    tensor: dict[str, Any] = {
        "name": name, "datatype": draw(st.sampled_from(["INT64", "BYTES", "FP32", "BOOL"])),
        "shape": draw(HOSTILE_SHAPES | st.just([1, 2])),
    }  # fmt: skip
    if draw(st.booleans()):
        tensor["data"] = draw(st.lists(LEAVES, max_size=4) | LEAVES)
    else:
        tensor["parameters"] = {"binary_data_size": draw(st.integers(0, 64) | HOSTILE_NUMBERS)}
    doc: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        doc["parameters"] = {"sequence_id": draw(SURROGATES | HOSTILE_NUMBERS | st.integers()),
                             "sequence_start": True}  # fmt: skip
    if draw(st.booleans()):
        doc["id"] = draw(SURROGATES)
    return doc


def encoded(body: bytes, how: str) -> tuple[dict[str, str], bytes]:
    """The body as sent: plain, compressed right, truncated, garbage, or an unknown coding."""
    if how == "plain":
        return {}, body
    if how == "gzip":
        return {"Content-Encoding": "gzip"}, gzip.compress(body)
    if how == "deflate-raw":
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return {"Content-Encoding": "deflate"}, packer.compress(body) + packer.flush()
    if how == "gzip-cut":
        return {"Content-Encoding": "gzip"}, gzip.compress(body)[: max(1, len(body) // 2)]
    if how == "deflate-garbage":
        return {"Content-Encoding": "deflate"}, b"x" + body
    return {"Content-Encoding": "br"}, body


BODIES = (
    st.builds(to_json, hostile_request())
    | st.builds(to_json, REQUESTS | JSON_VALUES | nearly_valid())
    | st.binary(max_size=200)
)
HEADER_LENGTHS = (
    st.none()
    | st.integers(-5, 400).map(str)
    | st.sampled_from(["9" * 40, "0x10", " 12", "1e3", "+5", "\u0661\u0662"])
)
INFER = "/v2/models/tiny-lstm/infer"
PATHS = st.sampled_from([INFER] * 8 + [
    "/v2/models/tiny-lstm/infer", "/v2/models/tiny-lstm/versions/1/infer",
    "/v2/models/tiny-lstm/versions/x/infer", "/v2/models/%2e%2e/infer", "/v2/health%2Flive",
    "/v2/repository/models/tiny-lstm/load", "/v2/repository/index", "/v2/models/%ff/infer",
    "/v2/models/tiny-lstm/infer?x=%00", "/v2//models", "/v2/models/stats",
])  # fmt: skip


def send(srv: ServerThread, method: str, path: str, headers: dict[str, str],
         body: bytes) -> tuple[int, str, bytes]:  # fmt: skip
    assert srv.app is not None and srv.app.http_port
    connection = http.client.HTTPConnection("127.0.0.1", srv.app.http_port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            connection.putheader(key, value.encode("utf-8"))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


@FUZZ
@given(
    method=st.sampled_from(["POST"] * 6 + ["GET", "PUT"]), path=PATHS, body=BODIES,
    how=st.sampled_from(["plain", "plain", "gzip", "deflate-raw", "gzip-cut", "deflate-garbage",
                         "br"]),
    header_length=HEADER_LENGTHS,
)  # fmt: skip
def test_fuzzed_http_requests_never_get_a_500(
    fuzzed: tuple[ServerThread, Errors], method: str, path: str, body: bytes, how: str,
    header_length: str | None,
) -> None:  # fmt: skip
    srv, errors = fuzzed
    headers, data = encoded(body, how)
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    status, content_type, reply = send(srv, method, path, headers, data)
    event(f"HTTP {status}")
    assert status in ACTIONABLE, (status, reply[:300])
    if status >= 400 and content_type.startswith("application/json"):
        assert set(json.loads(reply)) == {"error"}
        assert len(json.loads(reply)["error"]) <= 1024
    assert not errors.records, errors.records[0].getMessage()


def test_the_server_still_serves_after_the_fuzz(fuzzed: tuple[ServerThread, Errors]) -> None:
    srv, errors = fuzzed
    doc = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 3], "data": [1, 2, 3]}]}
    status, _, reply = send(srv, "POST", "/v2/models/tiny-lstm/infer", {}, to_json(doc))
    assert status == 200, reply
    assert srv.app is not None and srv.app.triton.read_ahead.used == 0
    assert not errors.records
