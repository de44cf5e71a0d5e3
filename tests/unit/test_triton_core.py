"""The protocol-neutral Triton core over a real engine on the tiny models (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from service.config import ServerConfig
from service.engine.core import Engine
from service.errors import LstmServeError
from service.protocol.sequences import SequenceIds, Sequences
from service.protocol.session import Limits, SessionLayer
from service.triton import grpc_codec, tensors
from service.triton.core import TritonCore
from service.triton.types import InferInput, InferRequest, RequestedOutput, http_status
from tests.unit.engines import load_engine


@pytest.fixture(scope="module")
def core(tiny_repo: Path) -> Iterator[TritonCore]:
    engine: Engine = load_engine(tiny_repo)
    config = ServerConfig(model_repository=tiny_repo, session_idle_timeout_s=60.0)
    yield TritonCore(Sequences(SessionLayer(engine, Limits()), SequenceIds(None)), config)
    engine.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def tokens(ids: list[list[int]]) -> InferInput:
    data = np.array(ids, dtype=np.int64)
    return InferInput("tokens", "INT64", data.shape, data)


def request(inp: InferInput, model: str = "tiny-lstm", outputs: tuple[RequestedOutput, ...] = (),
            **params: Any) -> InferRequest:  # fmt: skip
    return InferRequest(model=model, inputs=(inp,), outputs=outputs, parameters=params)


def classify(core: TritonCore, model: str, seqs: list[np.ndarray]) -> np.ndarray:
    async def go() -> np.ndarray:
        worker = core.engine.classify_model(model, 0)
        results = await core.engine.classify(worker, seqs, False)
        return np.stack([r.probs for r in results])

    return run(go())


def output(reply: Any, name: str) -> np.ndarray:
    return next(o.data for o in reply.outputs if o.name == name)


def test_a_sequence_in_chunks_equals_classify_of_the_whole(core: TritonCore) -> None:
    whole = [1, 2, 3, 4, 5, 6, 7]
    chunks = [whole[:3], whole[3:5], whole[5:]]

    async def go() -> np.ndarray:
        reply = None
        for i, chunk in enumerate(chunks):
            flags = {"sequence_start": i == 0, "sequence_end": i == len(chunks) - 1}
            reply = await core.infer(request(tokens([chunk]), sequence_id=7, **flags))
        return output(reply, "probs")

    probs = run(go())
    want = classify(core, "tiny-lstm", [np.array(whole)])
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
    assert len(core.engine.store) == 0  # END freed the sequence's session


def test_a_batch_without_sequence_id_is_independent_whole_sequences(core: TritonCore) -> None:
    rows = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 1, 0]]
    reply = run(core.infer(request(tokens(rows))))
    assert {o.name for o in reply.outputs} == {"probs", "step_probs"}  # none named: all
    assert output(reply, "step_probs").shape == (3, 4, 3)
    want = classify(core, "tiny-lstm", [np.array(r) for r in rows])
    np.testing.assert_allclose(output(reply, "probs"), want, rtol=1e-5, atol=1e-6)


def test_a_request_without_start_for_an_unknown_sequence_names_it(core: TritonCore) -> None:
    with pytest.raises(LstmServeError, match="sequence 'nope' of model 'tiny-lstm'") as info:
        run(core.infer(request(tokens([[1]]), sequence_id="nope")))
    assert info.value.code == "INVALID_ARGUMENT" and http_status(info.value) == 400


@pytest.mark.parametrize(
    ("inp", "words"),
    [
        (InferInput("tokens", "INT32", (1, 2), np.zeros((1, 2), np.int32)), "'tokens': datatype"),
        (InferInput("tokens", "INT64", (2,), np.zeros(2, np.int64)), r"'tokens': shape \[2\]"),
        (InferInput("frames", "INT64", (1, 2), np.zeros((1, 2), np.int64)), "'frames' is not"),
        (InferInput("tokens", "INT64", (1, 2), np.array([[1, 99]])), "out of range"),
    ],
)
def test_wrong_inputs_are_invalid_argument_naming_the_tensor(
    core: TritonCore, inp: InferInput, words: str
) -> None:
    with pytest.raises(LstmServeError, match=words) as info:
        run(core.infer(request(inp)))
    assert info.value.code == "INVALID_ARGUMENT"


def test_raw_bytes_of_the_wrong_size_name_the_tensor() -> None:
    with pytest.raises(LstmServeError, match="'tokens': 12 bytes of raw data, expected 16"):
        tensors.from_raw("tokens", "INT64", [1, 2], b"\0" * 12)
    raw = tensors.serialize_bytes(np.array([b"ab", b"c"], dtype=object))
    back = tensors.from_raw("text", "BYTES", [2], raw)
    assert back.tolist() == [b"ab", b"c"]
    with pytest.raises(LstmServeError, match="'text': BYTES element 1 claims"):
        tensors.from_raw("text", "BYTES", [2], raw[:-1])


def test_classification_returns_score_index_label(core: TritonCore) -> None:
    wanted = (RequestedOutput("probs", {"classification": 2}),)
    reply = run(core.infer(request(tokens([[1, 2, 3]]), outputs=wanted)))
    (out,) = reply.outputs
    assert out.datatype == "BYTES" and out.shape == (1, 2)
    probs = classify(core, "tiny-lstm", [np.array([1, 2, 3])])[0]
    best = int(probs.argmax())
    score, index, label = out.data[0, 0].decode().split(":")
    assert (int(index), label) == (best, f"class{best}")
    assert float(score) == pytest.approx(float(probs[best]), abs=1e-5)


def test_start_restarts_and_end_frees_the_session(core: TritonCore) -> None:
    store = core.engine.store
    before = len(store)

    async def go() -> tuple[np.ndarray, np.ndarray]:
        await core.infer(request(tokens([[5, 5, 5]]), sequence_id=9, sequence_start=True))
        assert len(store) == before + 1
        again = await core.infer(request(tokens([[1, 2]]), sequence_id=9, sequence_start=True))
        assert len(store) == before + 1  # the restart replaced the session
        last = await core.infer(request(tokens([[3]]), sequence_id=9, sequence_end=True))
        return output(again, "probs"), output(last, "probs")

    _, last = run(go())
    assert len(store) == before
    np.testing.assert_allclose(last, classify(core, "tiny-lstm", [np.array([1, 2, 3])]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_lstm_serve_seq_makes_a_resend_not_apply_twice(core: TritonCore) -> None:
    async def go() -> tuple[Any, Any]:
        start = request(tokens([[1, 2]]), sequence_id=11, sequence_start=True, lstm_serve_seq=1)
        first = await core.infer(start)
        resent = await core.infer(start)  # the reply was lost: the same request again
        nxt = request(tokens([[3]]), sequence_id=11, sequence_end=True, lstm_serve_seq=2)
        return first, resent, await core.infer(nxt)

    first, resent, last = run(go())
    assert resent.parameters["lstm_serve_duplicate"] is True
    np.testing.assert_array_equal(output(resent, "probs"), output(first, "probs"))
    np.testing.assert_allclose(output(last, "probs"),
                               classify(core, "tiny-lstm", [np.array([1, 2, 3])]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_interleaved_sequences_in_one_loop_each_equal_their_classify(core: TritonCore) -> None:
    seqs = {21: [1, 2, 3, 4], 22: [4, 3, 2, 1], "s": [7, 7, 8, 9]}

    async def go() -> dict[Any, np.ndarray]:
        replies: dict[Any, Any] = {}
        for step in range(4):
            calls = [
                core.infer(request(tokens([[ids[step]]]), sequence_id=key,
                                   sequence_start=step == 0, sequence_end=step == 3))
                for key, ids in seqs.items()
            ]  # fmt: skip
            for key, reply in zip(seqs, await asyncio.gather(*calls), strict=True):
                replies[key] = output(reply, "probs")
        return replies

    got = run(go())
    for key, ids in seqs.items():
        np.testing.assert_allclose(got[key], classify(core, "tiny-lstm", [np.array(ids)]),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_model_config_and_metadata_describe_the_tensors(core: TritonCore) -> None:
    config = core.model_config("tiny-rnn-frames")
    assert config.max_batch_size > 0
    assert [(i.name, list(i.dims)) for i in config.input] == [("features", [-1, 5])]
    assert [(o.name, list(o.dims)) for o in config.output] == [
        ("probs", [4]), ("step_probs", [-1, 4]),
    ]  # fmt: skip
    assert config.sequence_batching.max_sequence_idle_microseconds == 60_000_000
    policy = core.engine.registry.get("tiny-rnn-frames").batcher.policy
    assert config.sequence_batching.oldest.max_candidate_sequences == policy.max_batch_size
    meta = core.model_metadata("tiny-lstm")
    assert meta.versions == ("1", "2")
    first = meta.inputs[0]
    assert (first.name, first.datatype, first.shape) == ("tokens", "INT64", (-1, -1))
    assert core.model_ready("tiny-lstm") and not core.model_ready("nope")
    bilstm = core.model_config("tiny-bilstm")
    assert not bilstm.HasField("sequence_batching")
    start = request(tokens([[1, 2]]), model="tiny-bilstm", sequence_id=1, sequence_start=True)
    with pytest.raises(LstmServeError, match="without a sequence_id") as info:
        run(core.infer(start))
    assert info.value.code == "FAILED_PRECONDITION"


def test_statistics_count_inferences_and_failures(core: TritonCore) -> None:
    before = core.statistics("tiny-gru")[0]
    run(core.infer(request(tokens([[1, 2], [3, 4]]), model="tiny-gru")))
    with pytest.raises(LstmServeError):
        run(core.infer(request(tokens([[1, 99]]), model="tiny-gru")))
    after = core.statistics("tiny-gru")[0]
    assert after.inference_count == before.inference_count + 2
    assert after.success.count == before.success.count + 1
    assert after.fail.count == before.fail.count + 1


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"sequence_id": True}, "sequence_id = 'True' is not an integer or string"),
        ({"sequence_id": -1}, "sequence_id = -1 is not a uint64"),
        ({"sequence_id": "x" * 300}, "longer than 256"),
        ({"sequence_id": 3, "sequence_start": 1}, "sequence_start = '1' is not a bool"),
        ({"sequence_id": 3, "lstm_serve_seq": 0}, "lstm_serve_seq = '0' is not an integer >= 1"),
        ({"sequence_start": True}, "need a sequence_id"),
    ],
)
def test_bad_sequence_parameters_are_invalid_argument_naming_them(
    core: TritonCore, params: dict[str, Any], words: str
) -> None:
    with pytest.raises(LstmServeError, match=words) as info:
        run(core.infer(request(tokens([[1]]), **params)))
    assert info.value.code == "INVALID_ARGUMENT"


def test_typed_values_and_a_text_batch(core: TritonCore) -> None:
    ids = tensors.from_values("tokens", "INT64", [1, 3], [1, 2, 3])
    assert ids.dtype == np.int64 and ids.shape == (1, 3)
    with pytest.raises(LstmServeError, match="'tokens': 2 values, expected 3"):
        tensors.from_values("tokens", "INT64", [1, 3], [1, 2])
    texts = tensors.from_values("text", "BYTES", [2], ["ab", b"abc d"])
    reply = run(core.infer(request(InferInput("text", "BYTES", (2,), texts))))
    assert output(reply, "step_probs").shape == (2, 5, 3)  # the shorter text padded
    worker = core.engine.classify_model("tiny-lstm", 0)
    tokenizer = worker.description.tokenizer
    assert tokenizer is not None
    want = classify(core, "tiny-lstm", [np.array(tokenizer.encode(t)) for t in ("ab", "abc d")])
    np.testing.assert_allclose(output(reply, "probs"), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(output(reply, "step_probs")[0, 2:], 0)


def test_unknown_outputs_and_classification_on_steps_are_refused(core: TritonCore) -> None:
    for outputs, words in [
        ((RequestedOutput("logits"),), "output 'logits' is not an output"),
        ((RequestedOutput("step_probs", {"classification": 1}),), "per step"),
        ((RequestedOutput("probs", {"classification": "two"}),), "not a count"),
    ]:
        with pytest.raises(LstmServeError, match=words):
            run(core.infer(request(tokens([[1, 2]]), outputs=outputs)))


def test_server_metadata_and_the_repository_index(core: TritonCore) -> None:
    meta = core.server_metadata()
    assert meta.name == "lstm-serve" and "sequence" in meta.extensions
    rows = {(r.name, r.version): r.state for r in core.repository_index()}
    assert rows[("tiny-lstm", "2")] == "READY"
    assert core.live() and core.ready()


def text_input(text: str) -> InferInput:
    data = tensors.from_values("text", "BYTES", [1, 1], [text])
    return InferInput("text", "BYTES", (1, 1), data)


def test_streamed_text_is_fed_as_classify_feeds_the_whole_text(core: TritonCore) -> None:
    pieces = ["c", "afe", "\u0301 noi", "r"]  # a combining accent after the chunk boundary

    async def go() -> list[Any]:
        replies = []
        for i, piece in enumerate(pieces):
            flags = {"sequence_start": i == 0, "sequence_end": i == len(pieces) - 1}
            replies.append(await core.infer(request(text_input(piece), sequence_id="t", **flags)))
        return replies

    replies = run(go())
    first = replies[0]
    assert first.parameters["lstm_serve_held_characters"] == 1  # "c" may still change
    worker = core.engine.classify_model("tiny-lstm", 0)
    tokenizer = worker.description.tokenizer
    assert tokenizer is not None
    held_c = classify(core, "tiny-lstm", [np.array(tokenizer.encode("c"))])
    np.testing.assert_allclose(output(first, "probs"), held_c, rtol=1e-5, atol=1e-6)
    assert output(first, "step_probs").shape == (1, 1, 3)
    rewound = [r.parameters["lstm_serve_rewound_steps"] for r in replies]
    assert rewound == [0, 0, 1, 0]  # "e" became "é"
    ids = np.array(tokenizer.encode("cafe\u0301 noir"))
    last = replies[-1]
    assert last.parameters["lstm_serve_total_steps"] == len(ids) == 9
    np.testing.assert_allclose(output(last, "probs"), classify(core, "tiny-lstm", [ids]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    fed = sum(output(r, "step_probs").shape[1] for r in replies)
    assert fed == len(ids) + sum(rewound)  # every step answered, the rewound one twice


DATATYPES = ["INT64", "FP32", "BYTES", "INT32", "FP16", "BOOL", "NOPE", ""]
SHAPES = [[1, 3], [2, 2], [1, 2, 5], [3, 4, 5], [1], [2], [1, 1], [0, 3], [1, 0]]
COHERENT = [  # (model, input, datatype, shape) that a model takes
    ("tiny-lstm", "tokens", "INT64", [1, 3]), ("tiny-lstm", "tokens", "INT64", [2, 2]),
    ("tiny-lstm", "text", "BYTES", [1, 1]), ("tiny-rnn-frames", "features", "FP32", [1, 2, 5]),
    ("tiny-rnn-frames", "features", "FP32", [2, 1, 5]), ("tiny-bilstm", "tokens", "INT64", [1, 4]),
]  # fmt: skip
RANDOM = st.tuples(
    st.sampled_from(["tiny-lstm", "tiny-rnn-frames", "tiny-bilstm", "nope"]),
    st.sampled_from(["tokens", "features", "text", "lengths", "x"]),
    st.sampled_from(DATATYPES),
    st.sampled_from(SHAPES) | st.lists(st.integers(-2, 6), max_size=4) | st.just([1 << 40] * 2),
)
SEQUENCES = [{}, {"sequence_id": 5, "sequence_start": True}, {"sequence_id": "q"},
             {"sequence_id": "q", "sequence_start": True, "sequence_end": True}]  # fmt: skip
ANY = settings(max_examples=200, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip


def _request(target: tuple[str, str, str, list[int]], fit: bool, raw: bool, seed: int,
             sequence: dict[str, Any]) -> service_pb2.ModelInferRequest:  # fmt: skip
    model, name, datatype, shape = target
    rng = np.random.default_rng(seed)
    count = int(np.prod(shape)) if shape and all(0 <= d < 64 for d in shape) else 3
    count = count if fit else int(rng.integers(0, 9))
    msg = service_pb2.ModelInferRequest(model_name=model)
    tensor = msg.inputs.add(name=name, datatype=datatype, shape=shape)
    values = rng.integers(-2, 30, size=count)
    if raw and datatype == "BYTES":
        msg.raw_input_contents.append(tensors.serialize_bytes(np.array([b"ab c"] * count)))
    elif raw:
        dtype = {"FP32": np.float32, "FP16": np.float16, "INT32": np.int32}.get(datatype, np.int64)
        msg.raw_input_contents.append(values.astype(dtype).tobytes())
    elif datatype == "FP32":
        tensor.contents.fp32_contents.extend(values.astype(float).tolist())
    elif datatype == "BYTES":
        tensor.contents.bytes_contents.extend([b"hello"] * count)
    else:
        tensor.contents.int64_contents.extend(values.tolist())
    for key, value in sequence.items():
        param = msg.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        else:
            param.string_param = value
    return msg


@ANY
@given(target=st.sampled_from(COHERENT) | RANDOM, fit=st.booleans(), raw=st.booleans(),
       seed=st.integers(0, 1 << 30), sequence=st.sampled_from(SEQUENCES))  # fmt: skip
def test_any_grpc_request_is_answered_or_refused_with_a_status(
    core: TritonCore,
    target: tuple[str, str, str, list[int]],
    fit: bool,
    raw: bool,
    seed: int,
    sequence: dict[str, Any],
) -> None:
    msg = _request(target, fit, raw, seed, sequence)

    async def go() -> None:
        try:
            reply = await core.infer(grpc_codec.infer_request(msg))
        except LstmServeError as exc:
            assert exc.code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION"), exc
            event(exc.code)
            return
        grpc_codec.infer_response(reply)
        event("answered")

    run(go())


def test_sequences_are_scoped_by_the_caller(core: TritonCore) -> None:
    from service import principal

    async def go() -> None:
        principal.CALLER.set("alice")
        await core.infer(request(tokens([[1, 2]]), sequence_id=42, sequence_start=True))
        principal.CALLER.set("bob")
        with pytest.raises(LstmServeError, match="sequence 42 of model 'tiny-lstm' is not open"):
            await core.infer(request(tokens([[3]]), sequence_id=42))
        principal.CALLER.set("alice")
        await core.infer(request(tokens([[3]]), sequence_id=42, sequence_end=True))

    run(go())
