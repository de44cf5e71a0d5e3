"""The KServe v2 HTTP/REST front driven by the stock tritonclient.http and by plain urllib."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service.errors import ConfigError
from service.server import create_server
from tests.integration.conftest import ServerThread, make_config, metric, scrape, wait_for

TOKENS = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], dtype=np.int64)
CHUNKS = (3, 1, 4, 3)  # TOKENS in four requests


@pytest.fixture(scope="module")
def http_server(tiny_repo: Path) -> Iterator[ServerThread]:
    srv = ServerThread(make_config(tiny_repo, session_idle_timeout_s=30.0)).start()
    yield srv
    srv.stop()


def url_of(srv: ServerThread) -> str:
    assert srv.app is not None and srv.app.http_port
    return f"127.0.0.1:{srv.app.http_port}"


@pytest.fixture(scope="module")
def client(http_server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(url_of(http_server))
    yield c
    c.close()


def call(
    srv: ServerThread, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A plain urllib request -> (status, headers, body), errors included."""
    request = urllib.request.Request(f"http://{url_of(srv)}{path}", data=body,
                                     headers=headers or {})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def error_of(body: bytes) -> str:
    doc = json.loads(body)
    assert set(doc) == {"error"}
    return str(doc["error"])


def native_classify(srv: ServerThread, model: str, tokens: np.ndarray) -> pb.SequenceResult:
    with grpc.insecure_channel(srv.address) as channel:
        reply = pb_grpc.LstmServeStub(channel).Classify(
            pb.ClassifyRequest(model=model, version=1, sequences=[
                pb.SequenceInput(tokens=pb.TokenIds(ids=tokens.tolist()))
            ], step_probabilities=True),
            timeout=30,
        )  # fmt: skip
    return reply.results[0]


def tokens_input(values: np.ndarray, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("tokens", [1, len(values)], "INT64")
    tensor.set_data_from_numpy(values[None], binary_data=binary)
    return tensor


def run_sequence(
    client: httpclient.InferenceServerClient, seq_id: int | str, binary: bool
) -> list[httpclient.InferResult]:
    results, start = [], 0
    for i, size in enumerate(CHUNKS):
        part = TOKENS[start : start + size]
        start += size
        outputs = [httpclient.InferRequestedOutput("probs", binary_data=binary)]
        results.append(client.infer(
            "tiny-lstm", [tokens_input(part, binary)], model_version="1", outputs=outputs,
            sequence_id=seq_id, sequence_start=i == 0, sequence_end=i == len(CHUNKS) - 1,
        ))  # fmt: skip
    return results


# -- health and metadata ------------------------------------------------------------------------


def test_health_live_and_ready_by_tritonclient_and_urllib(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny-lstm") and client.is_model_ready("tiny-lstm", "2")
    assert not client.is_model_ready("no-such-model")
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny-gru/ready"):
        assert call(http_server, path)[0] == 200, path
    status, _, body = call(http_server, "/v2/models/no-such-model/ready")
    assert status == 404 and "no-such-model" in error_of(body)


def test_server_metadata_names_the_extensions(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta["name"] == "lstm-serve" and meta["version"]
    assert {"sequence", "classification", "binary_tensor_data", "model_repository",
            "statistics", "model_configuration"} <= set(meta["extensions"])  # fmt: skip


def test_model_metadata_describes_the_contract_tensors(
    client: httpclient.InferenceServerClient,
) -> None:
    meta = client.get_model_metadata("tiny-lstm")
    assert meta["name"] == "tiny-lstm" and meta["versions"] == ["1", "2"]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
    assert inputs["tokens"] == ("INT64", [-1, -1])
    outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
    assert outputs == {"probs": ("FP32", [-1, 3]), "step_probs": ("FP32", [-1, -1, 3])}
    frames = client.get_model_metadata("tiny-rnn-frames", "1")
    assert frames["versions"] == ["1"]
    assert frames["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, -1, 5]}]


def test_config_json_has_sequence_batching_with_the_idle_timeout(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    config = client.get_model_config("tiny-lstm")
    assert config["name"] == "tiny-lstm" and config["max_batch_size"] > 0
    assert config["input"][0]["name"] == "tokens"
    assert config["input"][0]["data_type"] == "TYPE_INT64" and config["input"][0]["dims"] == [-1]
    assert [o["name"] for o in config["output"]] == ["probs", "step_probs"]
    # 64-bit integers are JSON numbers, as Triton writes them (protobuf's JSON would quote them)
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == 30_000_000
    assert json.loads(config["parameters"]["labels"]["string_value"]) == [
        "class0", "class1", "class2"
    ]  # fmt: skip
    status, headers, body = call(http_server, "/v2/models/tiny-lstm/versions/2/config")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["name"] == "tiny-lstm"


# -- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("binary", "seq_id"), [(False, 101), (True, "http-binary-seq")])
def test_a_sequence_over_several_requests_equals_native_classify(
    http_server: ServerThread, client: httpclient.InferenceServerClient, binary: bool,
    seq_id: int | str,
) -> None:  # fmt: skip
    results = run_sequence(client, seq_id, binary)
    whole = native_classify(http_server, "tiny-lstm", TOKENS)
    final = results[-1].as_numpy("probs")
    assert final.shape == (1, 3) and final.dtype == np.float32
    np.testing.assert_allclose(final[0], whole.probabilities, rtol=1e-5, atol=1e-6)
    # every request's answer is the classification so far (the native per-step probabilities)
    ends = np.cumsum(CHUNKS) - 1
    for result, end in zip(results, ends, strict=True):
        np.testing.assert_allclose(
            result.as_numpy("probs")[0], whole.steps[end].values, rtol=1e-5, atol=1e-6
        )
    response = results[-1].get_response()
    assert response["model_name"] == "tiny-lstm" and response["model_version"] == "1"
    if binary:
        assert "data" not in response["outputs"][0]
    else:
        assert "data" in response["outputs"][0]


def test_sequence_ended_is_gone_and_unknown_sequence_is_named(
    client: httpclient.InferenceServerClient,
) -> None:
    run_sequence(client, 202, binary=True)
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny-lstm", [tokens_input(TOKENS[:2], True)], sequence_id=202)
    assert info.value.status() == "400" and "202" in info.value.message()
    assert "sequence_start" in info.value.message()


def test_whole_batch_without_sequence_id_and_every_output(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    batch = np.stack([TOKENS, TOKENS[::-1].copy()])
    tensor = httpclient.InferInput("tokens", list(batch.shape), "INT64")
    tensor.set_data_from_numpy(batch)
    result = client.infer("tiny-lstm", [tensor], model_version="1")  # no outputs named: all
    probs, steps = result.as_numpy("probs"), result.as_numpy("step_probs")
    assert probs.shape == (2, 3) and steps.shape == (2, len(TOKENS), 3)
    for row, tokens in zip(probs, batch, strict=True):
        whole = native_classify(http_server, "tiny-lstm", tokens)
        np.testing.assert_allclose(row, whole.probabilities, rtol=1e-5, atol=1e-6)


def test_classification_extension_answers_score_index_label(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    outputs = [httpclient.InferRequestedOutput("probs", class_count=2)]
    result = client.infer("tiny-lstm", [tokens_input(TOKENS, False)], model_version="1",
                          outputs=outputs)  # fmt: skip
    top = result.as_numpy("probs")
    assert top.shape == (1, 2)
    whole = np.asarray(native_classify(http_server, "tiny-lstm", TOKENS).probabilities)
    order = np.argsort(-whole)[:2]
    for item, index in zip(top[0], order, strict=True):
        score, idx, label = item.decode().split(":")
        assert int(idx) == index and label == f"class{index}"
        assert float(score) == pytest.approx(whole[index], abs=1e-5)


def raw_infer(
    srv: ServerThread, header: dict[str, Any], binary: bytes = b"", model: str = "tiny-lstm"
) -> tuple[int, bytes]:
    head = json.dumps(header).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(head))
    status, _, body = call(srv, f"/v2/models/{model}/infer", head + binary, headers)
    return status, body


def test_a_raw_binary_request_gets_binary_outputs(http_server: ServerThread) -> None:
    tokens = TOKENS[:4]
    header = {"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 4],
                          "parameters": {"binary_data_size": tokens.nbytes}}],
              "parameters": {"binary_data_output": True}}  # fmt: skip
    request = urllib.request.Request(
        f"http://{url_of(http_server)}/v2/models/tiny-lstm/versions/1/infer",
        data=json.dumps(header).encode() + tokens.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(json.dumps(header)))},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        length = int(response.headers["Inference-Header-Content-Length"])
        body = response.read()
    doc = json.loads(body[:length])
    (probs_meta, steps_meta) = doc["outputs"]
    assert probs_meta["parameters"]["binary_data_size"] == 12
    probs = np.frombuffer(body[length : length + 12], dtype="<f4")
    whole = native_classify(http_server, "tiny-lstm", tokens)
    np.testing.assert_allclose(probs, whole.probabilities, rtol=1e-5, atol=1e-6)
    assert len(body) == length + 12 + steps_meta["parameters"]["binary_data_size"]


@pytest.mark.parametrize(
    ("tensor", "binary", "needle"),
    [
        ({"name": "tokens", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}, b"",
         "datatype"),
        ({"name": "tokens", "datatype": "INT64", "shape": [2], "data": [1, 2]}, b"", "shape"),
        ({"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1, 2, 3]}, b"",
         "3 values"),
        ({"name": "tokens", "datatype": "INT64", "shape": [1, 2],
          "parameters": {"binary_data_size": 12}}, struct.pack("<3i", 1, 2, 3), "12 bytes"),
        ({"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1.5, 2]}, b"",
         "cannot take"),
    ],
    ids=["dtype", "shape", "count", "byte-size", "fraction"],
)  # fmt: skip
def test_wrong_dtype_shape_or_byte_size_is_400_naming_the_tensor(
    http_server: ServerThread, tensor: dict[str, Any], binary: bytes, needle: str
) -> None:
    status, body = raw_infer(http_server, {"inputs": [tensor]}, binary)
    message = error_of(body)
    assert status == 400, message
    assert "'tokens'" in message and needle in message


def test_wrong_dtype_through_tritonclient_is_400(client: httpclient.InferenceServerClient) -> None:
    tensor = httpclient.InferInput("tokens", [1, 3], "INT32")
    tensor.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("tiny-lstm", [tensor])
    assert info.value.status() == "400" and "tokens" in info.value.message()
    assert "INT64" in info.value.message()


def test_unknown_model_is_404(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    for call_it in (
        lambda: client.get_model_metadata("no-such-model"),
        lambda: client.get_model_config("no-such-model"),
        lambda: client.infer("no-such-model", [tokens_input(TOKENS[:2], True)]),
    ):
        with pytest.raises(InferenceServerException) as info:
            call_it()
        assert info.value.status() == "404" and "no-such-model" in info.value.message()
    status, _ = raw_infer(http_server, {"inputs": []}, model="no-such-model")
    assert status in (400, 404)
    assert call(http_server, "/v2/nowhere")[0] == 404


def test_malformed_json_body_is_400_with_a_short_message(http_server: ServerThread) -> None:
    for body in (b"{not json", b"[1, 2]", b'{"inputs": 5}', b"\xff\xfe", b"[" * 100_000):
        status, _, reply = call(http_server, "/v2/models/tiny-lstm/infer", body)
        message = error_of(reply)
        assert status == 400, message
        assert len(message) < 200, message


def test_a_body_past_the_limit_is_413(http_server: ServerThread) -> None:
    from service.triton.http_front import MAX_BODY_BYTES

    status, _, reply = call(http_server, "/v2/models/tiny-lstm/infer", b" " * (MAX_BODY_BYTES + 1))
    assert status == 413 and str(MAX_BODY_BYTES) in error_of(reply)
    assert call(http_server, "/v2/health/ready")[0] == 200  # the server goes on


def test_statistics_count_inferences_and_metrics_count_the_protocol(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    before = client.get_inference_statistics("tiny-gru", "1")["model_stats"][0]
    scraped = scrape(http_server.metrics_url)
    tensor = httpclient.InferInput("tokens", [1, 3], "INT64")
    tensor.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    client.infer("tiny-gru", [tensor])
    after = client.get_inference_statistics("tiny-gru", "1")["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 1
    assert after["inference_stats"]["success"]["count"] == (
        before["inference_stats"]["success"]["count"] + 1
    )
    labels = {"rpc": "ModelInfer", "model": "tiny-gru", "code": "OK", "protocol": "kserve-http"}
    name = "lstm_serve_requests_total"
    assert (
        metric(scrape(http_server.metrics_url), name, **labels)
        == metric(scraped, name, **labels) + 1
    )


# -- the repository -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def explicit_server(tiny_repo: Path) -> Iterator[ServerThread]:
    config = make_config(tiny_repo, model_control="explicit", load_models=("tiny-gru",))
    srv = ServerThread(config).start()
    yield srv
    srv.stop()


def test_repository_index_load_and_unload(explicit_server: ServerThread) -> None:
    client = httpclient.InferenceServerClient(url_of(explicit_server))
    try:
        assert not client.is_model_ready("tiny-rnn-frames")
        client.load_model("tiny-rnn-frames")
        assert client.is_model_ready("tiny-rnn-frames")
        index = {(r["name"], r.get("version")): r.get("state")
                 for r in client.get_model_repository_index()}  # fmt: skip
        assert index[("tiny-rnn-frames", "1")] == "READY" and index[("tiny-gru", "1")] == "READY"
        client.unload_model("tiny-rnn-frames")
        assert not client.is_model_ready("tiny-rnn-frames")
        with pytest.raises(InferenceServerException) as info:
            client.load_model("no-such-model")
        assert info.value.status() == "404" and "no-such-model" in info.value.message()
    finally:
        client.close()
    status, _, body = call(explicit_server, "/v2/repository/index", b'{"ready": true}')
    assert status == 200 and {r["name"] for r in json.loads(body)} == {"tiny-gru"}


def test_load_on_a_server_without_explicit_control_is_refused(
    client: httpclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.load_model("tiny-gru")
    assert info.value.status() == "400" and "explicit" in info.value.message()


# -- start-up -----------------------------------------------------------------------------------


def test_a_busy_http_port_fails_the_start_naming_it(tiny_repo: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        busy = sock.getsockname()[1]
        srv = ServerThread(make_config(tiny_repo, http_port=busy))
        srv.thread.start()

        async def start() -> None:
            app, _ = create_server(srv.config)
            try:
                await app.start()
            finally:
                await app.grpc.stop(None)
                app.engine.close()

        with pytest.raises(ConfigError, match=rf"127\.0\.0\.1:{busy} \(--http-port\)"):
            srv.call(start())
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(10)


def test_unsupported_triton_endpoints_are_501_naming_what_is_missing(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    for call_it, needle in (
        (lambda: client.register_system_shared_memory("region", "/key", 64), "shared memory"),
        (lambda: client.get_cuda_shared_memory_status(), "CUDA shared memory"),
        (lambda: client.get_trace_settings(), "trace"),
        (lambda: client.update_log_settings({"log_verbose_level": 1}), "--log-level"),
        (lambda: client.load_model("tiny-gru", config="{}"), "config"),
    ):
        with pytest.raises(InferenceServerException) as info:
            call_it()
        assert info.value.status() == "501" and needle in info.value.message()
    shm = {"shared_memory_region": "region", "shared_memory_byte_size": 16}
    tensor = {"name": "tokens", "datatype": "INT64", "shape": [1, 2], "parameters": shm}
    status, body = raw_infer(http_server, {"inputs": [tensor]})
    assert status == 501 and "shared memory" in error_of(body)


def test_large_replies_are_compressed_when_the_client_asks(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    batch = np.random.default_rng(0).integers(1, 27, size=(8, 200))
    tensor = httpclient.InferInput("tokens", list(batch.shape), "INT64")
    tensor.set_data_from_numpy(batch, binary_data=False)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=False) for n in ("probs", "step_probs")
    ]
    plain = client.infer("tiny-gru", [tensor], outputs=outputs)
    packed = client.infer("tiny-gru", [tensor], outputs=outputs,
                          response_compression_algorithm="gzip")  # fmt: skip
    np.testing.assert_array_equal(plain.as_numpy("step_probs"), packed.as_numpy("step_probs"))
    body = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [8, 200],
                                   "data": batch.ravel().tolist()}]}).encode()  # fmt: skip
    for accept, encoding in (("gzip", "gzip"), ("identity", None)):
        status, headers, _ = call(http_server, "/v2/models/tiny-gru/infer", body,
                                  {"Accept-Encoding": accept})  # fmt: skip
        assert status == 200 and headers.get("Content-Encoding") == encoding
    small = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2],
                                    "data": [1, 2]}]}).encode()  # fmt: skip
    _, headers, _ = call(
        http_server, "/v2/models/tiny-gru/infer", small, {"Accept-Encoding": "gzip"}
    )
    assert "Content-Encoding" not in headers  # a few hundred bytes: not worth compressing


def test_drain_turns_ready_503_finishes_inflight_requests_then_stops_listening(
    tiny_repo: Path,
) -> None:
    config = make_config(tiny_repo, model_control="explicit", load_models=("tiny-gru",))
    srv = ServerThread(config, run_delay_s=1.0).start()
    port = url_of(srv)
    answers: list[int] = []

    def slow_request() -> None:
        body = json.dumps({"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2],
                                       "data": [1, 2]}]}).encode()  # fmt: skip
        answers.append(call(srv, "/v2/models/tiny-gru/infer", body)[0])

    worker = threading.Thread(target=slow_request)
    try:
        worker.start()
        wait_for(lambda: srv.app is not None and srv.app.engine.inflight > 0, what="in flight")
        assert srv.app is not None
        stopping = asyncio.run_coroutine_threadsafe(srv.app.shutdown(grace_s=10), srv.loop)
        wait_for(lambda: call(srv, "/v2/health/ready")[0] == 503, what="ready 503")
        assert call(srv, "/v2/health/live")[0] == 200  # live until it stops
        worker.join(20)
        assert answers == [200]  # the request in flight was answered
        stopping.result(20)
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"http://{port}/v2/health/live", timeout=5)
    finally:
        srv.stop()  # (a drained server's shutdown returns at once)


# -- fuzz ---------------------------------------------------------------------------------------

FUZZ_MODELS = st.sampled_from(["tiny-lstm", "tiny-rnn-frames", "tiny-bilstm", "no-such-model"])
DATATYPES = st.sampled_from(["INT64", "FP32", "BYTES", "INT32", "BOOL", "FP16", "UINT64", "X"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=24,
)
HEADER_TEXT = st.text("0123456789+- xe", max_size=5)  # what urllib can send in a header
SHAPES = st.lists(st.integers(-2, 40), max_size=4) | JSON_VALUES
PARAMS = st.fixed_dictionaries({}, optional={
    "sequence_id": st.integers(-1, 2**64) | st.text(max_size=300) | JSON_VALUES,
    "sequence_start": st.booleans() | JSON_VALUES, "sequence_end": st.booleans(),
    "lstm_serve_seq": st.integers(-2, 5) | JSON_VALUES,
    "binary_data_output": st.booleans() | JSON_VALUES,
})  # fmt: skip
TENSORS = st.fixed_dictionaries(
    {"name": st.sampled_from(["tokens", "features", "text", "x"]), "datatype": DATATYPES,
     "shape": SHAPES},
    optional={"data": JSON_VALUES | st.lists(st.integers(-3, 40), max_size=40),
              "parameters": st.fixed_dictionaries({}, optional={
                  "binary_data_size": st.integers(-1, 64) | JSON_VALUES,
                  "shared_memory_region": st.text(max_size=4)})},
)  # fmt: skip
OUTPUTS = st.lists(st.fixed_dictionaries(
    {"name": st.sampled_from(["probs", "step_probs", "x"])},
    optional={"parameters": st.fixed_dictionaries({}, optional={
        "classification": st.integers(-1, 5) | JSON_VALUES, "binary_data": st.booleans()})},
), max_size=3)  # fmt: skip
SEQUENCE_PARAMS = st.fixed_dictionaries({"sequence_id": st.integers(0, 3) | st.sampled_from(["s"])},
                                        optional={"sequence_start": st.booleans(),
                                                  "sequence_end": st.booleans(),
                                                  "lstm_serve_seq": st.integers(1, 4)})  # fmt: skip


@st.composite
def nearly_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A tokens request for tiny-lstm that is right more often than not."""
    batch, steps = draw(st.integers(1, 3)), draw(st.integers(0, 6))
    data = draw(st.lists(st.integers(-1, 29), min_size=batch * steps, max_size=batch * steps))
    doc: dict[str, Any] = {
        "inputs": [{"name": "tokens", "datatype": "INT64", "shape": [batch, steps], "data": data}]
    }
    if draw(st.booleans()):
        doc["parameters"] = draw(SEQUENCE_PARAMS)
    if draw(st.booleans()):
        doc["outputs"] = draw(OUTPUTS)
    return doc


REQUESTS = st.fixed_dictionaries(
    {"inputs": st.lists(TENSORS, max_size=3)},
    optional={"parameters": PARAMS, "outputs": OUTPUTS, "id": JSON_VALUES},
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(case=st.tuples(st.just("tiny-lstm"), nearly_valid(), st.just(b""), st.none())
       | st.tuples(FUZZ_MODELS, REQUESTS | JSON_VALUES, st.binary(max_size=64),
                   st.none() | st.integers(-5, 4000).map(str) | HEADER_TEXT))  # fmt: skip
def test_fuzzed_infer_bodies_get_a_status_a_client_can_act_on(
    http_server: ServerThread, case: tuple[str, object, bytes, str | None]
) -> None:
    model, doc, tail, header = case
    body = json.dumps(doc).encode() + tail
    headers = {} if header is None else {"Inference-Header-Content-Length": header}
    status, _, reply = call(http_server, f"/v2/models/{model}/infer", body, headers)
    assert status in (200, 400, 404, 409, 429, 501), reply[:300]
    event(f"HTTP {status}")
    if status != 200:
        assert len(error_of(reply)) <= 1024


def test_compressed_request_bodies_are_read_and_bounded_after_decompression(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    import gzip

    from service.triton.http_front import MAX_BODY_BYTES

    plain = client.infer("tiny-gru", [tokens_input(TOKENS, True)]).as_numpy("probs")
    for algorithm in ("gzip", "deflate"):
        packed = client.infer("tiny-gru", [tokens_input(TOKENS, True)],
                              request_compression_algorithm=algorithm)  # fmt: skip
        np.testing.assert_array_equal(packed.as_numpy("probs"), plain)
    bomb = gzip.compress(b" " * (MAX_BODY_BYTES + 1), compresslevel=1)  # ~0.3 MB on the wire
    status, _, reply = call(http_server, "/v2/models/tiny-gru/infer", bomb,
                            {"Content-Encoding": "gzip"})  # fmt: skip
    assert status == 413 and "limit" in error_of(reply)


# -- a model that came with its own config.pbtxt ------------------------------------------------


@pytest.fixture(scope="module")
def own_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Any]]:
    """A user's ONNX model with its config.pbtxt (tests/integration/test_generic_models.py)."""
    from tests.integration.test_generic_models import write_model

    repo = tmp_path_factory.mktemp("http-own")
    model = write_model(repo, "chars")
    srv = ServerThread(make_config(repo)).start()
    yield srv, model
    srv.stop()


def test_a_config_pbtxt_model_keeps_its_config_and_tensor_names_over_http(
    own_model: tuple[ServerThread, Any],
) -> None:
    from tests.integration.test_generic_models import WORD, torch_step_logits

    srv, model = own_model
    client = httpclient.InferenceServerClient(url_of(srv))
    try:
        config = client.get_model_config("chars")
        assert [o["name"] for o in config["output"]] == ["logits"]
        assert config["max_batch_size"] == 64 and config["input"][0]["name"] == "tokens"
        got, pieces = [], [WORD[:4], WORD[4:5], WORD[5:]]
        for i, piece in enumerate(pieces):
            tensor = httpclient.InferInput("tokens", [1, len(piece)], "INT64")
            tensor.set_data_from_numpy(np.asarray(piece, dtype=np.int64)[None])
            result = client.infer("chars", [tensor], sequence_id="own-1", sequence_start=i == 0,
                                  sequence_end=i == len(pieces) - 1,
                                  outputs=[httpclient.InferRequestedOutput("logits")])  # fmt: skip
            got.append(result.as_numpy("logits")[0])
    finally:
        client.close()
    # the model's logits as it computes them (what Triton returns), not their softmax
    np.testing.assert_allclose(np.concatenate(got), torch_step_logits(model, WORD), atol=1e-5)


def test_requests_beyond_the_bytes_in_flight_budget_wait_their_turn(tiny_repo: Path) -> None:
    config = make_config(tiny_repo, read_ahead_total_bytes=64, read_ahead_bytes=64,
                         model_control="explicit", load_models=("tiny-gru",))  # fmt: skip
    srv = ServerThread(config).start()
    try:
        tokens = {"name": "tokens", "datatype": "INT64", "shape": [1, 40], "data": [1] * 40}
        body = json.dumps({"inputs": [tokens]}).encode()
        assert len(body) > 64  # every request alone exceeds the budget: one at a time
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda: statuses.append(
            call(srv, "/v2/models/tiny-gru/infer", body)[0])) for _ in range(8)]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert statuses == [200] * 8
        assert srv.app is not None
        assert srv.app.triton.read_ahead.used == 0
    finally:
        srv.stop()


def test_a_resent_end_is_answered_again_after_the_sequence_ended(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    """END's reply lost: the END sent again (same lstm_serve_seq) gets the kept result as a
    duplicate, not "not open"; an older seq is 409; without lstm_serve_seq it is a new request
    (not open)."""

    def send(seq: int | None, part: np.ndarray, start: bool = False,
             end: bool = False) -> httpclient.InferResult:  # fmt: skip
        params = {} if seq is None else {"lstm_serve_seq": seq}
        return client.infer("tiny-lstm", [tokens_input(part, True)], model_version="1",
                            sequence_id="resent-end", sequence_start=start, sequence_end=end,
                            parameters=params,
                            outputs=[httpclient.InferRequestedOutput("probs")])  # fmt: skip

    send(1, TOKENS[:3], start=True)
    ended = send(2, TOKENS[3:], end=True)
    again = send(2, TOKENS[3:], end=True)
    assert again.get_response()["parameters"]["lstm_serve_duplicate"] is True
    assert again.get_response()["parameters"]["lstm_serve_total_steps"] == len(TOKENS)
    np.testing.assert_array_equal(again.as_numpy("probs"), ended.as_numpy("probs"))
    with pytest.raises(InferenceServerException) as older:
        send(1, TOKENS[:3], end=True)
    assert older.value.status() == "409" and "when it ended" in older.value.message()
    with pytest.raises(InferenceServerException) as unnumbered:
        send(None, TOKENS[3:], end=True)
    assert unnumbered.value.status() == "400" and "not open" in unnumbered.value.message()


def test_lstm_serve_seq_makes_resends_exactly_once_over_http(
    http_server: ServerThread, client: httpclient.InferenceServerClient
) -> None:
    def send(seq: int, part: np.ndarray, start: bool = False) -> httpclient.InferResult:
        return client.infer("tiny-lstm", [tokens_input(part, True)], model_version="1",
                            sequence_id="resend-1",
                            sequence_start=start, parameters={"lstm_serve_seq": seq},
                            outputs=[httpclient.InferRequestedOutput("probs")])  # fmt: skip

    send(1, TOKENS[:3], start=True)
    second = send(2, TOKENS[3:5])
    again = send(2, TOKENS[3:5])  # the reply was lost: the resend is not applied twice
    assert again.get_response()["parameters"]["lstm_serve_duplicate"] is True
    assert again.get_response()["parameters"]["lstm_serve_total_steps"] == 5
    np.testing.assert_array_equal(again.as_numpy("probs"), second.as_numpy("probs"))
    with pytest.raises(InferenceServerException) as info:
        send(1, TOKENS[:3])  # older than the last applied: its result is gone
    assert info.value.status() == "409" and "lstm_serve_seq 1" in info.value.message()
    third = send(3, TOKENS[5:])
    assert third.get_response()["parameters"]["lstm_serve_total_steps"] == len(TOKENS)
    whole = native_classify(http_server, "tiny-lstm", TOKENS)  # nothing applied twice
    np.testing.assert_allclose(third.as_numpy("probs")[0], whole.probabilities, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
