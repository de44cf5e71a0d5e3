"""Early decisions through a real server: the reply where a session's rule first holds says so
(the label, its probability, the step), as Classify's per-step probabilities of the same
sequence show; with end_when_decided the session ends there, on Stream, StreamMulti and a
Triton sequence; streamed text decides on the text sent so far, held letters included."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from lstmserve.client import LstmClient, decision_rule
from lstmserve.v1 import lstm_serve_pb2 as pb
from lstmserve.v1 import lstm_serve_pb2_grpc as pb_grpc
from service.engine.session.decisions import NO_RUN, judge
from service.engine.types import Decision, DecisionRule
from tests.integration.conftest import ServerThread, wait_for

MODEL = "tiny-lstm"
IDS = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]


@pytest.fixture
def stub(stream_server: ServerThread) -> Iterator[pb_grpc.LstmServeStub]:
    """Through each front: the Python one and the native one (where built)."""
    with grpc.insecure_channel(stream_server.address) as channel:
        yield pb_grpc.LstmServeStub(channel)


def tokens(ids: list[int]) -> pb.SequenceInput:
    return pb.SequenceInput(tokens=pb.TokenIds(ids=ids))


def step_probs(stub: pb_grpc.LstmServeStub, source: pb.SequenceInput) -> np.ndarray:
    request = pb.ClassifyRequest(model=MODEL, sequences=[source], step_probabilities=True)
    result = stub.Classify(request).results[0]
    return np.array([s.values for s in result.steps], dtype=np.float32)  # (T, C)


def expected(stub: pb_grpc.LstmServeStub, rule: DecisionRule) -> Decision | None:
    rows = step_probs(stub, tokens(IDS))
    return judge(rule, NO_RUN, rows, len(rows), 0)[1]


def halfway(stub: pb_grpc.LstmServeStub, margin: bool = False) -> float:
    """A threshold the tiny model's random answers reach about half-way through IDS."""
    rows = np.sort(step_probs(stub, tokens(IDS)), axis=1)
    values = rows[:, -1] - rows[:, -2] if margin else rows[:, -1]
    return float(np.sort(values)[len(values) // 2])


def rule_msg(rule: DecisionRule) -> pb.DecisionRule:
    return pb.DecisionRule(probability=rule.probability, margin=rule.margin, steps=rule.steps,
                           end_when_decided=rule.end_when_decided)  # fmt: skip


def stream(
    stub: pb_grpc.LstmServeStub, rule: DecisionRule, chunk: int = 3
) -> list[pb.StreamResponse]:
    options = pb.StreamOptions(decide=rule_msg(rule))
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL, options=options))]
    for seq, start in enumerate(range(0, len(IDS), chunk), start=1):
        ids = IDS[start : start + chunk]
        requests.append(pb.StreamRequest(chunk=pb.Chunk(seq=seq, input=tokens(ids))))
    requests.append(pb.StreamRequest(end=pb.End()))
    return list(stub.Stream(iter(requests), timeout=30))


def decided(replies: list[pb.StreamResponse]) -> list[pb.ChunkResult]:
    return [
        r.chunk for r in replies if r.WhichOneof("kind") == "chunk" and r.chunk.HasField("decision")
    ]


@pytest.mark.parametrize(("margin", "steps"), [(False, 1), (False, 2), (True, 1), (True, 3)])
def test_the_reply_where_the_rule_first_holds_says_so(
    stub: pb_grpc.LstmServeStub, margin: bool, steps: int
) -> None:
    value = halfway(stub, margin)
    rule = DecisionRule(margin=value, steps=steps) if margin else DecisionRule(value, steps=steps)
    want = expected(stub, rule)
    replies = stream(stub, rule)
    marked = decided(replies)
    assert want is not None  # the thresholds are chosen so that it holds before the end
    [reply] = marked  # once, in the reply covering that step
    assert reply.total_steps - reply.steps < want.step <= reply.total_steps
    d = reply.decision
    assert (d.index, d.step, d.ended) == (want.label, want.step, False)
    assert d.label == f"class{want.label}" and abs(d.probability - want.probability) <= 1e-6
    assert replies[-1].WhichOneof("kind") == "ended"  # not ended by the decision


def test_end_when_decided_ends_the_stream_and_frees_the_session(
    server: ServerThread, stub: pb_grpc.LstmServeStub
) -> None:
    rule = DecisionRule(halfway(stub), end_when_decided=True)
    want = expected(stub, rule)
    assert want is not None
    before = len(server.app.engine.store)  # type: ignore[union-attr]
    replies = stream(stub, rule)
    last = replies[-1]
    assert last.WhichOneof("kind") == "chunk" and last.chunk.decision.ended  # no reply after it
    assert last.chunk.decision.step == want.step
    wait_for(lambda: len(server.app.engine.store) == before, what="the session freed")  # type: ignore[union-attr]
    resume = pb.StreamRequest(resume=pb.ResumeSession(session_id=last.session_id))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Stream(iter([resume]), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_stream_multi_ends_a_decided_session_and_answers_its_later_entries_not_found(
    stub: pb_grpc.LstmServeStub,
) -> None:
    rule = rule_msg(DecisionRule(halfway(stub), end_when_decided=True))
    want = expected(stub, DecisionRule(rule.probability))
    assert want is not None
    requests: queue.Queue[pb.StreamMultiRequest | None] = queue.Queue()
    replies = stub.StreamMulti(iter(requests.get, None), timeout=30)
    deciding = pb.OpenSession(model=MODEL, options=pb.StreamOptions(decide=rule))
    opens = [pb.SessionRequest(open=deciding), pb.SessionRequest(open=pb.OpenSession(model=MODEL))]
    try:
        requests.put(pb.StreamMultiRequest(entries=opens))
        ids = [r.session_id for r in next(replies).results]
        entries = [
            pb.SessionRequest(session_id=s, chunk=pb.Chunk(seq=seq, input=tokens([i])))
            for seq, i in enumerate(IDS, start=1)
            for s in ids
        ]
        requests.put(pb.StreamMultiRequest(entries=entries))
        results = next(replies).results
    finally:
        requests.put(None)
    mine = [r for r in results if r.session_id == ids[0]]
    step = want.step
    assert mine[step - 1].chunk.decision.ended and mine[step - 1].chunk.total_steps == step
    assert all(r.error.code == "NOT_FOUND" for r in mine[step:])
    other = [r for r in results if r.session_id == ids[1]]
    assert all(r.chunk.total_steps == n for n, r in enumerate(other, start=1))  # undisturbed


def test_streamed_text_decides_on_the_text_sent_so_far(stub: pb_grpc.LstmServeStub) -> None:
    """One character per chunk: the decision is where Classify of the text so far first
    shows the rule holding, a held letter (answered, not settled) included."""
    text = "the quick brown fox jumps over the lazy dog"
    rows = step_probs(stub, pb.SequenceInput(text=text))
    top = np.sort(rows.max(axis=1))
    rule = DecisionRule(float(top[len(top) // 2]), steps=2)
    want = judge(rule, NO_RUN, rows, len(rows), 0)[1]
    assert want is not None
    options = pb.StreamOptions(decide=rule_msg(rule))
    requests = [pb.StreamRequest(open=pb.OpenSession(model=MODEL, options=options))]
    requests += [pb.StreamRequest(chunk=pb.Chunk(seq=i, input=pb.SequenceInput(text=c)))
                 for i, c in enumerate(text, start=1)]  # fmt: skip
    [reply] = decided(list(stub.Stream(iter(requests), timeout=30)))
    assert (reply.decision.index, reply.decision.step) == (want.label, want.step)
    assert reply.total_steps == want.step  # the first reply whose text shows it


def test_a_triton_sequence_takes_the_rule_as_a_request_parameter(
    server: ServerThread, stub: pb_grpc.LstmServeStub
) -> None:
    rule = DecisionRule(halfway(stub))
    want = expected(stub, rule)
    assert want is not None
    client = tc.InferenceServerClient(server.address)
    spec = f"{rule.probability!r},1"
    try:
        params: list[dict] = []
        for i, token in enumerate(IDS):
            data = tc.InferInput("tokens", [1, 1], "INT64")
            data.set_data_from_numpy(np.array([[token]], dtype=np.int64))
            try:
                result = client.infer(MODEL, [data], sequence_id="decide-1", sequence_start=i == 0,
                                      parameters={"lstm_serve_decide_at": spec,
                                                  "lstm_serve_end_when_decided": True})  # fmt: skip
            except InferenceServerException as exc:
                assert i == want.step and "not open" in exc.message()  # ended by the decision
                break
            params.append(dict(result.get_response().parameters))
        decided_at = [i for i, p in enumerate(params) if "lstm_serve_decided_step" in p]
        assert decided_at == [want.step - 1]
        p = params[want.step - 1]
        assert p["lstm_serve_decided_step"].int64_param == want.step
        assert p["lstm_serve_decided_label"].string_param == f"class{want.label}"
        assert p["lstm_serve_sequence_ended"].bool_param
        with pytest.raises(InferenceServerException, match="lstm_serve_decide_at") as info:
            client.infer(MODEL, [data], sequence_id="decide-2", sequence_start=True,
                         parameters={"lstm_serve_decide_at": "1.5"})  # fmt: skip
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


def test_the_python_client_stops_at_a_decision_that_ended_the_session(
    server: ServerThread, stub: pb_grpc.LstmServeStub
) -> None:
    value = halfway(stub)
    want = expected(stub, DecisionRule(value))
    assert want is not None

    async def main() -> tuple[int, pb.SessionEnded]:
        async with LstmClient(server.address) as client:
            session = await client.open_session(MODEL, decide=decision_rule(f"{value!r}", True))
            for token in IDS:
                await session.step([token])
                if session.ended_by_decision:
                    break
            return session.decided.total_steps, await session.end()  # type: ignore[union-attr]

    steps, ended = asyncio.run(main())
    assert steps == want.step == ended.total_steps and len(ended.probabilities) == 3


def test_stream_columns_refuses_a_session_with_a_rule_it_cannot_report(
    stub: pb_grpc.LstmServeStub,
) -> None:
    rule = pb.DecisionRule(probability=0.9)
    opens = [pb.OpenSession(model=MODEL, options=pb.StreamOptions(decide=rule)),
             pb.OpenSession(model=MODEL)]  # fmt: skip
    reply = next(stub.StreamColumns(iter([pb.ColumnsRequest(open=opens)]), timeout=30))
    [error] = reply.attach_errors
    assert (error.index, error.code) == (0, grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "does not report decisions" in error.message and reply.session_ids[1]
