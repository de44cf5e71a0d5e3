"""The stock tritonclient (gRPC, sync and asyncio) against a real lstm-serve on 127.0.0.1:0.

Every result is compared with the native API's Classify of the whole sequence on the same
server (the same model files, the same onnxruntime sessions).
"""

from __future__ import annotations

import asyncio
import queue
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from tests.integration.conftest import ServerThread, make_config, metric, scrape, wait_for

LOADED = ("tiny-lstm", "tiny-rnn-frames", "tiny-gru")


@pytest.fixture(scope="module")
def srv(tiny_repo: Path) -> Iterator[ServerThread]:
    config = make_config(tiny_repo, model_control="explicit", load_models=LOADED,
                         session_idle_timeout_s=30.0)  # fmt: skip
    server = ServerThread(config).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(srv: ServerThread) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(srv.address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def native(srv: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    channel = grpc.insecure_channel(srv.address)
    yield pb_grpc.LstmServeStub(channel)
    channel.close()


def classify(native: pb_grpc.LstmServeStub, model: str, seqs: list[np.ndarray]) -> np.ndarray:
    """The native Classify of whole sequences: (N, C)."""
    inputs = []
    for s in seqs:
        if s.ndim == 1:
            inputs.append(pb.SequenceInput(tokens=pb.TokenIds(ids=s.tolist())))
        else:
            inputs.append(pb.SequenceInput(frames=pb.Frames(values=s.reshape(-1).tolist())))
    reply = native.Classify(pb.ClassifyRequest(model=model, sequences=inputs))
    return np.array([r.probabilities for r in reply.results], dtype=np.float32)


def token_input(ids: list[int] | np.ndarray, name: str = "tokens") -> tc.InferInput:
    data = np.asarray(ids, dtype=np.int64).reshape(1, -1)
    inp = tc.InferInput(name, list(data.shape), "INT64")
    inp.set_data_from_numpy(data)
    return inp


def close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_health_and_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "lstm-serve"
    assert {"sequence", "classification", "model_repository"} <= set(meta.extensions)
    assert client.is_model_ready("tiny-lstm") and not client.is_model_ready("no-such-model")
    model = client.get_model_metadata("tiny-rnn-frames")
    assert model.versions == ["1"] and model.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("features", "FP32", [-1, -1, 5]),
    ]  # fmt: skip
    assert [(t.name, list(t.shape)) for t in model.outputs] == [
        ("probs", [-1, 4]), ("step_probs", [-1, -1, 4]),
    ]  # fmt: skip
    config = client.get_model_config("tiny-lstm").config
    assert config.max_batch_size > 0 and config.input[0].name == "tokens"
    assert config.sequence_batching.max_sequence_idle_microseconds == 30_000_000
    with pytest.raises(InferenceServerException, match="no-such-model") as info:
        client.get_model_metadata("no-such-model")
    assert info.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("sequence_id", [424242, "user-7:utterance"])
def test_a_sequence_over_model_infer_calls_equals_classify(
    client: tc.InferenceServerClient, native: pb_grpc.LstmServeStub, sequence_id: int | str
) -> None:
    whole = [3, 1, 4, 1, 5, 9, 2, 6]
    chunks = [whole[:3], whole[3:4], whole[4:]]
    for i, chunk in enumerate(chunks):
        result = client.infer(
            "tiny-lstm", [token_input(chunk)], sequence_id=sequence_id,
            sequence_start=i == 0, sequence_end=i == len(chunks) - 1,
            outputs=[tc.InferRequestedOutput("probs"), tc.InferRequestedOutput("step_probs")],
        )  # fmt: skip
        assert result.as_numpy("step_probs").shape == (1, len(chunk), 3)
    close(result.as_numpy("probs"), classify(native, "tiny-lstm", [np.array(whole)]))


def test_interleaved_sequences_over_one_stream_each_equal_their_classify(
    srv: ServerThread, native: pb_grpc.LstmServeStub
) -> None:
    rng = np.random.default_rng(0)
    seqs = {sid: rng.integers(0, 28, size=6) for sid in (101, 102, 103)}
    seqs_frames = {"frames-a": rng.normal(size=(5, 5)).astype(np.float32)}
    replies: queue.Queue[Any] = queue.Queue()
    client = tc.InferenceServerClient(srv.address)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        for step in range(6):  # one request of every sequence per round, all on one stream
            for sid, ids in seqs.items():
                client.async_stream_infer(
                    "tiny-lstm", [token_input(ids[step : step + 1])], request_id=f"{sid}:{step}",
                    sequence_id=sid, sequence_start=step == 0, sequence_end=step == 5,
                    outputs=[tc.InferRequestedOutput("probs")],
                )  # fmt: skip
            if step < 5:
                frames = seqs_frames["frames-a"][step : step + 1][None]  # (1, 1, 5)
                inp = tc.InferInput("features", list(frames.shape), "FP32")
                inp.set_data_from_numpy(frames)
                client.async_stream_infer(
                    "tiny-rnn-frames", [inp], request_id=f"frames-a:{step}",
                    sequence_id="frames-a", sequence_start=step == 0, sequence_end=step == 4,
                )  # fmt: skip
        got: dict[str, list[np.ndarray]] = {}
        for _ in range(6 * 3 + 5):
            result, error = replies.get(timeout=20)
            assert error is None, error
            sid = result.get_response().id.split(":")[0]
            got.setdefault(sid, []).append(result.as_numpy("probs"))
    finally:
        client.stop_stream()
        client.close()
    for sid, ids in seqs.items():
        assert len(got[str(sid)]) == 6
        close(got[str(sid)][-1], classify(native, "tiny-lstm", [ids]))
    close(got["frames-a"][-1], classify(native, "tiny-rnn-frames", [seqs_frames["frames-a"]]))


def test_stream_errors_are_in_band_and_the_stream_goes_on(srv: ServerThread) -> None:
    replies: queue.Queue[Any] = queue.Queue()
    client = tc.InferenceServerClient(srv.address)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    try:
        client.async_stream_infer("tiny-lstm", [token_input([1])], sequence_id=555)  # no START
        _, error = replies.get(timeout=20)
        assert error is not None and "sequence 555 of model 'tiny-lstm'" in str(error)
        client.async_stream_infer("tiny-lstm", [token_input([1, 2])])  # the stream is still open
        result, error = replies.get(timeout=20)
        assert error is None and result.as_numpy("probs").shape == (1, 3)
    finally:
        client.stop_stream()
        client.close()


def test_the_asyncio_client_streams_sequences(
    srv: ServerThread, native: pb_grpc.LstmServeStub
) -> None:
    seqs = {"a": [1, 2, 3, 4], "b": [9, 8, 7, 6]}

    async def go() -> dict[str, np.ndarray]:
        async with tca.InferenceServerClient(srv.address) as client:
            assert await client.is_server_ready()

            async def requests() -> Any:
                for step in range(4):
                    for sid, ids in seqs.items():
                        data = np.array([[ids[step]]], dtype=np.int64)
                        inp = tca.InferInput("tokens", [1, 1], "INT64")
                        inp.set_data_from_numpy(data)
                        yield {"model_name": "tiny-gru", "inputs": [inp], "request_id": sid,
                               "sequence_id": sid, "sequence_start": step == 0,
                               "sequence_end": step == 3}  # fmt: skip

            last: dict[str, np.ndarray] = {}
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                last[result.get_response().id] = result.as_numpy("probs")
            return last

    last = asyncio.run(go())
    for sid, ids in seqs.items():
        close(last[sid], classify(native, "tiny-gru", [np.array(ids)]))


def test_end_frees_the_session(srv: ServerThread, client: tc.InferenceServerClient) -> None:
    assert srv.app is not None
    store = srv.app.engine.store
    gauge = lambda: metric(scrape(srv.metrics_url), "lstm_serve_active_sessions",  # noqa: E731
                           model="tiny-lstm")  # fmt: skip
    before, gauge_before = len(store), gauge()
    client.infer("tiny-lstm", [token_input([1, 2])], sequence_id=777, sequence_start=True)
    assert len(store) == before + 1 and gauge() == gauge_before + 1
    client.infer("tiny-lstm", [token_input([3])], sequence_id=777, sequence_end=True)
    assert len(store) == before
    wait_for(lambda: gauge() == gauge_before, what="the sessions gauge back down")
    with pytest.raises(InferenceServerException, match="sequence 777 of model 'tiny-lstm'"):
        client.infer("tiny-lstm", [token_input([4])], sequence_id=777)  # ended: not open


def test_a_request_without_start_for_an_unknown_id_names_the_sequence(
    client: tc.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException, match="sequence 'never-started'") as info:
        client.infer("tiny-lstm", [token_input([1])], sequence_id="never-started")
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "sequence_start" in info.value.message()
    two = tc.InferInput("tokens", [2, 1], "INT64")
    two.set_data_from_numpy(np.array([[1], [2]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="batch size 1") as info:
        client.infer("tiny-lstm", [two], sequence_id=5, sequence_start=True)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_classification_returns_score_index_label(
    client: tc.InferenceServerClient, native: pb_grpc.LstmServeStub
) -> None:
    ids = [5, 6, 7, 8]
    result = client.infer(
        "tiny-lstm", [token_input(ids)], outputs=[tc.InferRequestedOutput("probs", class_count=2)]
    )
    top = result.as_numpy("probs")
    assert top.shape == (1, 2)
    probs = classify(native, "tiny-lstm", [np.array(ids)])[0]
    order = np.argsort(-probs, kind="stable")[:2]
    for j, entry in enumerate(top[0]):
        score, index, label = entry.decode().split(":")
        assert int(index) == order[j] and label == f"class{order[j]}"
        assert float(score) == pytest.approx(float(probs[order[j]]), abs=1e-5)


def _raw_request(name: str, datatype: str, shape: list[int], raw: bytes) -> Any:
    request = service_pb2.ModelInferRequest(model_name="tiny-lstm")
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


@pytest.mark.parametrize(
    ("name", "datatype", "shape", "raw", "words"),
    [
        ("tokens", "INT32", [1, 2], np.zeros(2, np.int32).tobytes(), "datatype 'INT32'"),
        ("tokens", "INT64", [2], np.zeros(2, np.int64).tobytes(), r"shape \[2\]"),
        ("tokens", "INT64", [1, 2], b"\0" * 12, "12 bytes of raw data, expected 16"),
        ("words", "INT64", [1, 1], b"\0" * 8, "input 'words' is not an input"),
    ],
)
def test_wrong_dtype_shape_or_byte_size_is_invalid_argument_naming_the_tensor(
    srv: ServerThread, name: str, datatype: str, shape: list[int], raw: bytes, words: str
) -> None:
    with grpc.insecure_channel(srv.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_raw_request(name, datatype, shape, raw), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"'{name}'" in info.value.details()
    assert re.search(words, info.value.details())


def test_malformed_bytes_are_invalid_argument(srv: ServerThread) -> None:
    with grpc.insecure_channel(srv.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff", timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in info.value.details()


def test_shared_memory_is_unimplemented(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException, match="not supported") as info:
        client.get_system_shared_memory_status()
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"


def test_repository_load_and_unload_drive_model_control(
    client: tc.InferenceServerClient, srv: ServerThread
) -> None:
    def state(name: str) -> str:
        rows = client.get_model_repository_index().models
        return next(r.state for r in rows if r.name == name)

    assert state("tiny-cifg-frames") == "UNAVAILABLE"
    client.load_model("tiny-cifg-frames")
    assert state("tiny-cifg-frames") == "READY" and client.is_model_ready("tiny-cifg-frames")
    client.unload_model("tiny-cifg-frames")
    assert not client.is_model_ready("tiny-cifg-frames")
    with pytest.raises(InferenceServerException, match="no-such") as info:
        client.load_model("no-such-model")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    client.unload_model("no-such-model")  # not loaded: already unloaded, as Triton answers


def test_a_batch_without_sequence_id_equals_classify(
    client: tc.InferenceServerClient, native: pb_grpc.LstmServeStub
) -> None:
    rows = np.array([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1], [7, 7, 7, 7, 7], [0, 1, 0, 1, 0]])
    inp = tc.InferInput("tokens", list(rows.shape), "INT64")
    inp.set_data_from_numpy(rows.astype(np.int64))
    result = client.infer("tiny-lstm", [inp])  # no outputs named: every output
    assert result.as_numpy("step_probs").shape == (4, 5, 3)
    close(result.as_numpy("probs"), classify(native, "tiny-lstm", list(rows)))
    stats = client.get_inference_statistics("tiny-lstm").model_stats
    assert sum(s.inference_count for s in stats) >= 4


def test_typed_contents_and_text_are_accepted(
    srv: ServerThread, native: pb_grpc.LstmServeStub
) -> None:
    ids = [4, 8, 15, 16, 23]
    request = service_pb2.ModelInferRequest(model_name="tiny-lstm")
    request.inputs.add(name="tokens", datatype="INT64", shape=[1, len(ids)])
    request.inputs[0].contents.int64_contents.extend(ids)
    request.outputs.add(name="probs")
    text = service_pb2.ModelInferRequest(model_name="tiny-lstm")
    text.inputs.add(name="text", datatype="BYTES", shape=[2])
    text.inputs[0].contents.bytes_contents.extend([b"hello world", b"abc"])
    text.outputs.add(name="probs")
    with grpc.insecure_channel(srv.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = stub.ModelInfer(request, timeout=10)
        texts = stub.ModelInfer(text, timeout=10)
    probs = np.frombuffer(typed.raw_output_contents[0], dtype=np.float32)
    close(probs, classify(native, "tiny-lstm", [np.array(ids)])[0])
    got = np.frombuffer(texts.raw_output_contents[0], dtype=np.float32).reshape(2, 3)
    reply = native.Classify(pb.ClassifyRequest(model="tiny-lstm", sequences=[
        pb.SequenceInput(text="hello world"), pb.SequenceInput(text="abc"),
    ]))  # fmt: skip
    close(got, np.array([r.probabilities for r in reply.results], dtype=np.float32))


def test_lstm_serve_seq_answers_a_resend_without_applying_it_twice(
    client: tc.InferenceServerClient, native: pb_grpc.LstmServeStub
) -> None:
    def send(ids: list[int], seq: int, **flags: bool) -> Any:
        return client.infer("tiny-lstm", [token_input(ids)], sequence_id=31337,
                            parameters={"lstm_serve_seq": seq}, **flags)  # fmt: skip

    first = send([1, 2, 3], 1, sequence_start=True)
    again = send([1, 2, 3], 1, sequence_start=True)  # its reply was lost: sent again
    params = again.get_response().parameters
    assert params["lstm_serve_duplicate"].bool_param and params["lstm_serve_seq"].int64_param == 1
    close(again.as_numpy("probs"), first.as_numpy("probs"))
    last = send([4, 5], 2, sequence_end=True)
    close(last.as_numpy("probs"), classify(native, "tiny-lstm", [np.array([1, 2, 3, 4, 5])]))


@pytest.fixture(scope="module")
def slow(tiny_repo: Path) -> Iterator[ServerThread]:
    """Every model run takes 20 ms more: chunks that arrive meanwhile wait and share a run."""
    config = make_config(tiny_repo, model_control="explicit", load_models=("tiny-lstm",))
    server = ServerThread(config, run_delay_s=0.02).start()
    yield server
    server.stop()


def test_requests_of_many_sequences_on_one_stream_share_batches(slow: ServerThread) -> None:
    samples = lambda: scrape(slow.metrics_url)  # noqa: E731
    name = "lstm_serve_batch_size"
    before = samples()
    runs0 = metric(before, f"{name}_count", model="tiny-lstm")
    rows0 = metric(before, f"{name}_sum", model="tiny-lstm")
    replies: queue.Queue[Any] = queue.Queue()
    client = tc.InferenceServerClient(slow.address)
    client.start_stream(callback=lambda result, error: replies.put((result, error)))
    sequences = range(900, 932)
    try:
        for sid in sequences:
            client.async_stream_infer("tiny-lstm", [token_input([1, 2, 3])], sequence_id=sid,
                                      sequence_start=True, sequence_end=True)  # fmt: skip
        for _ in sequences:
            _, error = replies.get(timeout=20)
            assert error is None, error
    finally:
        client.stop_stream()
        client.close()
    after = samples()
    rows = metric(after, f"{name}_sum", model="tiny-lstm") - rows0
    runs = metric(after, f"{name}_count", model="tiny-lstm") - runs0
    assert rows == len(sequences) and runs < rows  # some runs carried several sequences


@pytest.fixture(scope="module")
def tight(tiny_repo: Path) -> Iterator[ServerThread]:
    """Two sessions at most, idle after 0.5 s."""
    config = make_config(tiny_repo, model_control="explicit", load_models=("tiny-lstm",),
                         max_sessions=2, session_idle_timeout_s=0.5)  # fmt: skip
    server = ServerThread(config).start()
    yield server
    server.stop()


def test_an_idle_sequence_expires_and_the_session_limit_holds(tight: ServerThread) -> None:
    with tc.InferenceServerClient(tight.address) as client:
        config = client.get_model_config("tiny-lstm").config
        assert config.sequence_batching.max_sequence_idle_microseconds == 500_000
        client.infer("tiny-lstm", [token_input([1])], sequence_id=1, sequence_start=True)
        client.infer("tiny-lstm", [token_input([1])], sequence_id=2, sequence_start=True)
        with pytest.raises(InferenceServerException, match="maximum of 2 sessions") as info:
            client.infer("tiny-lstm", [token_input([1])], sequence_id=3, sequence_start=True)
        assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert tight.app is not None
        wait_for(lambda: len(tight.app.engine.store) == 0, what="both sequences expired")
        with pytest.raises(
            InferenceServerException, match="sequence 1 of model 'tiny-lstm' expired"
        ):
            client.infer("tiny-lstm", [token_input([2])], sequence_id=1)
        client.infer("tiny-lstm", [token_input([1])], sequence_id=3, sequence_start=True)


@pytest.fixture(scope="module")
def own_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Any]]:
    """A user's own ONNX models with their config.pbtxt (tests/integration/test_generic_models):
    `chars` (max_batch_size 64, a batch-first state) and `chars-torch` (max_batch_size 0)."""
    from tests.integration.test_generic_models import write_model

    repo = tmp_path_factory.mktemp("triton-own")
    models = {"chars": write_model(repo, "chars"),
              "chars-torch": write_model(repo, "chars-torch", kind="torch")}  # fmt: skip
    server = ServerThread(make_config(repo)).start()
    yield server, models
    server.stop()


@pytest.mark.parametrize("name", ["chars", "chars-torch"])
def test_a_config_pbtxt_model_is_served_with_its_own_config_and_names(
    own_models: tuple[ServerThread, Any], name: str
) -> None:
    from tests.integration.test_generic_models import WORD, torch_step_logits

    server, models = own_models
    with tc.InferenceServerClient(server.address) as client:
        config = client.get_model_config(name).config
        assert config.name == name and [o.name for o in config.output] == ["logits"]
        idle = config.sequence_batching.max_sequence_idle_microseconds  # its own, else ours
        assert idle == (30_000_000 if name == "chars" else 600_000_000)
        batched = config.max_batch_size > 0
        meta = client.get_model_metadata(name)
        assert [list(t.shape) for t in meta.outputs] == [[-1, -1, 3]]  # [B, T, C] either way
        assert meta.inputs[0].name == "tokens" and batched == (name == "chars")
        got = []
        pieces = [WORD[:4], WORD[4:5], WORD[5:]]
        for i, piece in enumerate(pieces):
            result = client.infer(name, [token_input(piece)], sequence_id=f"{name}-1",
                                  sequence_start=i == 0, sequence_end=i == len(pieces) - 1,
                                  outputs=[tc.InferRequestedOutput("logits")])  # fmt: skip
            got.append(result.as_numpy("logits")[0])
    # the model's logits as it computes them (what Triton returns), not their softmax
    np.testing.assert_allclose(np.concatenate(got), torch_step_logits(models[name], WORD),
                               atol=1e-5)  # fmt: skip


def test_health_reflection_and_the_protocol_label_cover_the_service(
    srv: ServerThread, client: tc.InferenceServerClient
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    name = "inference.GRPCInferenceService"
    with grpc.insecure_channel(srv.address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=name)
        )
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        database = ProtoReflectionDescriptorDatabase(channel)
        assert name in database.get_services()
        assert database.FindFileContainingSymbol(name).name.endswith(".proto")
    count = lambda: metric(scrape(srv.metrics_url), "lstm_serve_requests_total",  # noqa: E731
                           rpc="ModelInfer", protocol="kserve-grpc", code="OK")  # fmt: skip
    before = count()
    client.infer("tiny-lstm", [token_input([1, 2])])
    assert count() == before + 1


def test_malformed_bytes_on_the_stream_are_answered_in_band(srv: ServerThread) -> None:
    good = service_pb2.ModelInferRequest(model_name="tiny-lstm", id="good")
    good.inputs.add(name="tokens", datatype="INT64", shape=[1, 2])
    good.raw_input_contents.append(np.array([1, 2], dtype=np.int64).tobytes())
    with grpc.insecure_channel(srv.address) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        replies = list(call(iter([b"\xff\xff\xff", good.SerializeToString()]), timeout=20))
    assert len(replies) == 2
    errors = [r.error_message for r in replies if r.error_message]
    assert len(errors) == 1 and "not a valid inference.ModelInferRequest" in errors[0]
    assert [r.infer_response.id for r in replies if not r.error_message] == ["good"]


def test_an_unloaded_model_finishes_its_open_sequences(client: tc.InferenceServerClient) -> None:
    model = "tiny-peephole-frames"

    def frames(n: int) -> tc.InferInput:
        data = np.ones((1, n, 5), dtype=np.float32)
        inp = tc.InferInput("features", list(data.shape), "FP32")
        inp.set_data_from_numpy(data)
        return inp

    def state() -> str:
        return next(r.state for r in client.get_model_repository_index().models if r.name == model)

    client.load_model(model)
    client.infer(model, [frames(2)], sequence_id=61, sequence_start=True)
    client.unload_model(model)
    assert state() == "UNLOADING" and not client.is_model_ready(model)
    client.infer(model, [frames(1)], sequence_id=61)  # the open sequence goes on
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [frames(1)], sequence_id=62, sequence_start=True)
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    client.infer(model, [frames(1)], sequence_id=61, sequence_end=True)
    assert state() == "UNAVAILABLE"  # its last sequence ended: retired


def test_a_uint64_sequence_id_above_the_int64_range(
    srv: ServerThread, native: pb_grpc.LstmServeStub
) -> None:
    def request(ids: list[int], **flags: bool) -> Any:
        msg = _raw_request("tokens", "INT64", [1, len(ids)], np.array(ids, np.int64).tobytes())
        msg.parameters["sequence_id"].uint64_param = (1 << 64) - 1
        for key, value in flags.items():
            msg.parameters[key].bool_param = value
        return msg

    with grpc.insecure_channel(srv.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(request([1, 2], sequence_start=True), timeout=10)
        last = stub.ModelInfer(request([3], sequence_end=True), timeout=10)
    probs = np.frombuffer(last.raw_output_contents[0], dtype=np.float32)
    close(probs, classify(native, "tiny-lstm", [np.array([1, 2, 3])])[0])


def test_errors_of_a_sequence_name_it_never_its_session_id(
    client: tc.InferenceServerClient,
) -> None:
    client.infer("tiny-lstm", [token_input([1])], sequence_id=4242, sequence_start=True,
                 parameters={"lstm_serve_seq": 1})  # fmt: skip
    with pytest.raises(InferenceServerException) as info:  # a gap: seq 3 after 1
        client.infer("tiny-lstm", [token_input([2])], sequence_id=4242,
                     parameters={"lstm_serve_seq": 3})  # fmt: skip
    assert info.value.status() == "StatusCode.FAILED_PRECONDITION"
    text = info.value.message()
    assert "sequence 4242 of model 'tiny-lstm'" in text and "takes seq 2 next" in text
    assert not re.search(r"[0-9a-f]{16}", text), text  # no internal id
    client.infer("tiny-lstm", [token_input([2])], sequence_id=4242, sequence_end=True)


def test_a_restart_continues_the_new_sequence_and_a_bad_start_changes_nothing(
    client: tc.InferenceServerClient, native: pb_grpc.LstmServeStub
) -> None:
    client.infer("tiny-gru", [token_input([1, 2, 3])], sequence_id=31, sequence_start=True)
    bad = tc.InferInput("tokens", [1, 1], "FP32")
    bad.set_data_from_numpy(np.array([[1.0]], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="datatype"):
        client.infer("tiny-gru", [bad], sequence_id=31, sequence_start=True)
    kept = client.infer("tiny-gru", [token_input([4])], sequence_id=31)
    close(kept.as_numpy("probs")[0], classify(native, "tiny-gru", [np.array([1, 2, 3, 4])])[0])
    client.infer("tiny-gru", [token_input([9, 9])], sequence_id=31, sequence_start=True)
    last = client.infer("tiny-gru", [token_input([5])], sequence_id=31, sequence_end=True)
    close(last.as_numpy("probs")[0], classify(native, "tiny-gru", [np.array([9, 9, 5])])[0])


def test_a_draining_server_ends_model_stream_infer_with_unavailable(tiny_repo: Path) -> None:
    config = make_config(tiny_repo, model_control="explicit", load_models=("tiny-gru",))
    server = ServerThread(config).start()
    replies: queue.Queue[Any] = queue.Queue()
    client = tc.InferenceServerClient(server.address)
    try:
        client.start_stream(callback=lambda result, error: replies.put((result, error)))
        client.async_stream_infer("tiny-gru", [token_input([1, 2])], sequence_id=8,
                                  sequence_start=True)  # fmt: skip
        result, error = replies.get(timeout=20)
        assert error is None and result.as_numpy("probs").shape == (1, 3)
        assert server.app is not None
        server.call(server.app.shutdown(5.0))
        _, error = replies.get(timeout=20)  # the stream ends: UNAVAILABLE, continue elsewhere
        assert error is not None and "StatusCode.UNAVAILABLE" in str(error.status()), error
        assert "draining" in str(error)
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
        server.stop()
